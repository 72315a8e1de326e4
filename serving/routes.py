"""The routes the request guard covers, read from a BentoML service's API signatures."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileField:
    """An upload route's multipart field: its name, and whether it takes several files."""

    name: str
    many: bool


def api_routes(service) -> tuple[dict[str, FileField], list[str]]:
    """A BentoML service's APIs -> (the routes that take files, with their field; the routes that take no
    input): what the guard must cover, read from the API signatures. An API taking anything else stops
    the service from starting (TypeError): the guard would not know how to check its requests."""
    files: dict[str, FileField] = {}
    empty: list[str] = []
    for api in service.apis.values():
        if api.is_task:  # its /submit, /status and /get routes would pass the guard unchecked
            raise TypeError(f"{service.name}.{api.name} is a task API: serving/guard.py does not check its routes")
        inputs = [(name, kind) for name, kind in typing.get_type_hints(api.func).items() if name != "return"]
        if not inputs:
            empty.append(api.route)
        elif len(inputs) == 1 and inputs[0][1] in (Path, list[Path]):
            files[api.route] = FileField(inputs[0][0], many=inputs[0][1] != Path)
        else:
            raise TypeError(
                f"{service.name}.{api.name} takes {inputs}: serving/guard.py checks APIs of one file, a list of "
                "files or no input; teach it this kind of request before adding the API"
            )
    return files, empty
