"""Image intake for tongue photographs: fetch (data: or http(s)), decode, validate, resize."""

from .intake import ImageIntake

__all__ = ["ImageIntake"]
