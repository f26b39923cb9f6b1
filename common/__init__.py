"""Shared by coordinator and client."""
