"""Checks shared by the models' configuration dataclasses."""

import dataclasses


def check_positive_ints(config) -> None:
    """Raise unless every ``int`` field of the dataclass ``config`` is a positive int (not a
    bool), naming the class and field."""
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name}.{field.name} must be an int, got {value!r}.")
        if field.type is int and value < 1:
            raise ValueError(f"{name}.{field.name} must be positive, got {value}.")
