"""`mretrieve config show`: the effective configuration, and which layer set each value.

A new user cannot otherwise tell whether a value came from the packaged defaults, a --config file or a
$MRETRIEVE_* variable. The database URL's password is masked.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import click
import yaml

DEFAULTS = "defaults"


def _layer(source: str) -> str:
    from mammo_retrieval.core.config import ENV_OVERRIDES
    return f"env ${source}" if source in ENV_OVERRIDES else f"file {source}"


def origins(config) -> dict[tuple[str, str], str]:
    """(section, key) -> the layer that set it last: 'file PATH' or 'env $VAR' (absent: the defaults)."""
    from mammo_retrieval.core.config import ENV_OVERRIDES
    out: dict[tuple[str, str], str] = {}
    for source in config.source:
        if source == DEFAULTS:
            continue
        if source in ENV_OVERRIDES:
            out[ENV_OVERRIDES[source]] = _layer(source)
            continue
        data = yaml.safe_load(Path(source).read_text()) or {}  # load_config has validated it
        for section, values in data.items():
            for key in values or {}:
                out[(section, key)] = _layer(source)
    return out


def render(config, env: Mapping[str, str]) -> str:
    """YAML of the effective config; values not from the defaults carry a comment naming their layer."""
    from mammo_retrieval.core.config import ENV_HOME, default_config_file
    layers = [f"{DEFAULTS} ({default_config_file()})"]  # where this install reads them
    layers += [_layer(source) for source in config.source if source != DEFAULTS]
    home = f"{env[ENV_HOME]} (env ${ENV_HOME})" if env.get(ENV_HOME) else f"{os.getcwd()} (the current folder)"
    lines = ["# effective mretrieve configuration; layers in order, later ones win:",
             *(f"#   {i}. {layer}" for i, layer in enumerate(layers, 1)),
             f"# home, {{home}} in paths: {home}"]
    effective = {}
    for field in dataclasses.fields(config):
        if field.name != "source":
            effective[field.name] = {k: _plain(v) for k, v in dataclasses.asdict(getattr(config, field.name)).items()}
    from mammo_retrieval.storage.catalog.database import mask_url  # the one masking rule, loaded lazily
    effective["paths"]["database_url"] = mask_url(effective["paths"]["database_url"])
    from mammo_retrieval.core.config import SECRET_KEYS
    for section, key in SECRET_KEYS:  # a secret never shows; only whether one is set
        if effective[section][key]:
            effective[section][key] = "***"
    # block sections, one line per key (leaf lists in flow style), so each line can carry its origin
    text = yaml.dump(effective, Dumper=_Dumper, default_flow_style=False, sort_keys=False, width=10**6)
    set_by, section = origins(config), None
    for line in text.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        else:
            origin = set_by.get((section, line.strip().split(":", 1)[0]))
            line += f"  # {origin}" if origin else ""
        lines.append(line)
    return "\n".join(lines)


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists: one line per key."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.pass_context
def show(ctx: click.Context) -> None:
    """Print the effective config as YAML, with the layer (defaults, file, env) that set each value."""
    click.echo(render(ctx.obj, os.environ))
