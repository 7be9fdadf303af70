"""Samplers (diffusers `SchedulerMixin` subclasses) and classifier-free guidance weight schedules."""
