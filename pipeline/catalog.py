"""The backbone catalog: ``models/backbones.toml`` loaded into :class:`BackboneSpec` rows."""
from __future__ import annotations

import difflib
import functools
import tomllib
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.types import BackboneSpec, Preprocessing

CATALOG_PATH = Path(__file__).resolve().parent.parent / "models" / "backbones.toml"
DEFAULT_BACKBONE = "mobilenet_v1_0.25_224"


def _row_to_spec(row: dict) -> BackboneSpec:
    prep = Preprocessing(
        size=int(row["input_size"]), mean=float(row["mean"]), std=float(row["std"])
    )
    return BackboneSpec(
        name=row["name"],
        url=row.get("url"),
        sha256=row.get("sha256"),
        member=row.get("member"),
        input_tensor=row["input_tensor"],
        bottleneck_tensor=row["bottleneck_tensor"],
        feature_size=int(row["feature_size"]),
        preprocessing=prep,
        license=row.get("license", "unknown"),
        notes=row.get("notes", ""),
        alternates=tuple(row.get("alternates", ())),
    )


@functools.cache
def load_catalog(path: Path = CATALOG_PATH) -> dict[str, BackboneSpec]:
    """Returns every catalog entry keyed by name, in file order."""
    with open(path, "rb") as f:
        rows = tomllib.load(f)["backbone"]
    return {row["name"]: _row_to_spec(row) for row in rows}


def get_backbone(name: str) -> BackboneSpec:
    """Looks up one backbone by name.

    Raises:
        ConfigError: the name is not in the catalog (the message suggests close names).
    """
    catalog = load_catalog()
    if name in catalog:
        return catalog[name]
    close = difflib.get_close_matches(name, catalog, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `edgepipe fetch --list`"
    raise ConfigError(f"unknown backbone {name!r}: {hint}")


def custom_backbone(
    graph: Path,
    input_tensor: str,
    bottleneck_tensor: str,
    input_size: int,
    mean: float,
    std: float,
    feature_size: int = 0,
) -> BackboneSpec:
    """A user's own frozen graph described on the command line (feature size found at load)."""
    return BackboneSpec(
        name=f"custom:{graph.name}",
        local_path=str(graph.resolve()),
        input_tensor=input_tensor,
        bottleneck_tensor=bottleneck_tensor,
        feature_size=feature_size,
        preprocessing=Preprocessing(size=input_size, mean=mean, std=std),
    )
