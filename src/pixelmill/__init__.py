"""pixelmill: turn a CSV of products and image URLs into processed images, at any scale."""

__version__ = "0.1.0"
