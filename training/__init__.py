"""accelerate training scripts (`accelerate launch training/train_<thing>.py`) and the utilities they share."""
