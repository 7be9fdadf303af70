"""Video-caption training data for `train_video_ldm.py`.

Sources: the built-in captioned moving digits (`storydiff.data.moving_digits`), a video folder (`metadata.jsonl` +
one folder of frames per video, `storydiff.data.moving_digits.load_video_folder`), or a `datasets` dataset with a
column of frame lists (`--frames_column`) and a caption column. Every item is `{"pixel_values": (3, F, H, W) in
[-1, 1], "caption": str, "index": int}`: `F = --num_frames` frames, every `--frame_stride`-th one, from a random
start when the video is longer (drawn from torch's global generator, which checkpoints save and restore).
"""

from typing import Optional

import torch
from torch.utils.data import Dataset

from storydiff.training.text_image_data import image_to_tensor


class VideoCaptionDataset(Dataset):
    """In-memory videos `(N, 3, F, H, W)` with captions, or a `datasets.Dataset` of frame lists read lazily."""

    def __init__(
        self,
        videos: Optional[torch.Tensor] = None,
        captions: Optional[list] = None,
        hf_dataset=None,
        frames_column: str = "frames",
        caption_column: str = "text",
        num_frames: int = 8,
        frame_stride: int = 1,
        resolution: int = 32,
    ):
        self.videos, self.captions, self.hf_dataset = videos, captions, hf_dataset
        self.frames_column, self.caption_column = frames_column, caption_column
        self.num_frames, self.frame_stride, self.resolution = num_frames, frame_stride, resolution
        if videos is not None and videos.shape[2] < self.span:
            raise ValueError(
                f"The videos have {videos.shape[2]} frames; --num_frames {num_frames} with --frame_stride "
                f"{frame_stride} needs {self.span}."
            )

    @property
    def span(self) -> int:
        """Frames of the source video one clip covers."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def __len__(self) -> int:
        return len(self.captions) if self.hf_dataset is None else len(self.hf_dataset)

    def _clip_indices(self, length: int, index: int) -> range:
        if length < self.span:
            raise ValueError(
                f"Video {index} has {length} frames; --num_frames {self.num_frames} with --frame_stride "
                f"{self.frame_stride} needs at least {self.span}. Drop shorter videos or lower the flags."
            )
        start = int(torch.randint(0, length - self.span + 1, ())) if length > self.span else 0
        return range(start, start + self.span, self.frame_stride)

    def __getitem__(self, index: int) -> dict:
        if self.hf_dataset is None:
            clip = self.videos[index][:, list(self._clip_indices(self.videos.shape[2], index))]
            return {"pixel_values": clip, "caption": self.captions[index], "index": index}
        row = self.hf_dataset[index]
        frames = row[self.frames_column]
        chosen = [frames[i] for i in self._clip_indices(len(frames), index)]
        clip = torch.stack([image_to_tensor(frame, self.resolution) for frame in chosen], dim=1)
        caption = row[self.caption_column]
        return {"pixel_values": clip, "caption": caption if isinstance(caption, str) else "", "index": index}

    def all_captions(self) -> list:
        if self.hf_dataset is None:
            return list(self.captions)
        return list(self.hf_dataset[self.caption_column])


def collate_videos(examples: list) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "index": torch.tensor([example["index"] for example in examples]),
    }
