"""Kefu: customer-service instant messaging."""

__version__ = "0.1.0"
