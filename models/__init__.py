"""Networks (diffusers `ModelMixin` subclasses)."""
