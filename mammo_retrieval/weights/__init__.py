"""Weights shipped with the package (the built-in encoder's); read with importlib.resources, never downloaded."""
