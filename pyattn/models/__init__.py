"""Example models built on pyattn ops."""
