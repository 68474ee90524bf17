"""The hooks of the `Objective` protocol for a method that needs no preparation and keeps no state."""

from __future__ import annotations


class Stateless:
    def prepare(self, system, examples) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
