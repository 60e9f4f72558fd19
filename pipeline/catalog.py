"""The backbone catalog: ``models/backbones.toml`` loaded into :class:`BackboneSpec` rows.

The rows also recognise a graph: :func:`match_backbones` compares a graph's tensor names and
static shapes with every row's input (name, ``[N,size,size,3]``) and bottleneck (name or an
alternate, ``C`` features), so ``--graph`` or ``--model-graph`` alone is enough for a known
architecture. It is a comparison of data against data: a backbone added to the toml file is
recognised without code.
"""
from __future__ import annotations

import difflib
import functools
import tomllib
from pathlib import Path
from typing import Mapping, Sequence

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


@functools.cache
def _fine_tune_table(path: Path = CATALOG_PATH) -> dict[str, tuple[str, ...]]:
    """Catalog name → its family's blocks, last first (``family`` and ``[fine_tune_blocks]``)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    blocks = data.get("fine_tune_blocks", {})
    return {row["name"]: tuple(blocks.get(row.get("family", row["name"]), ())) for row in data["backbone"]}


def fine_tune_blocks(name: str | None) -> tuple[str, ...]:
    """The blocks ``--fine-tune N`` can train in a catalog backbone, from the last one back, each
    the prefix of its ops' names; empty for a name the catalog does not know (or None)."""
    return _fine_tune_table().get(name or "", ())


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
    *,
    recognised_as: str | None = None,
    prefix: str = "custom",
) -> BackboneSpec:
    """A user's own frozen graph described on the command line (feature size found at load).

    Args:
        recognised_as: the catalog row the graph was recognised as (:func:`match_backbones`); its
            license and the fact are recorded in the spec's ``license`` and ``notes``.
        prefix: ``custom`` for a backbone (``--graph``), ``adopted`` for a whole model
            (``--model-graph``); the spec is named ``PREFIX:FILE``.
    """
    notes, license_ = "", "unknown"
    if recognised_as:
        row = get_backbone(recognised_as)
        notes = f"recognised as catalog backbone {row.name} by its tensor names and shapes"
        license_ = row.license
    return BackboneSpec(
        name=f"{prefix}:{graph.name}",
        local_path=str(graph.resolve()),
        input_tensor=input_tensor,
        bottleneck_tensor=bottleneck_tensor,
        feature_size=feature_size,
        preprocessing=Preprocessing(size=input_size, mean=mean, std=std),
        license=license_,
        notes=notes,
    )


# --- recognising a graph by its tensors ---------------------------------------------------------

Shape = Sequence[int | None] | None


def catalog_tensor_names(catalog: Mapping[str, BackboneSpec] | None = None) -> list[str]:
    """Every input and bottleneck (alternates too) name the catalog mentions: what a graph's
    shapes are looked up for before :func:`match_backbones`."""
    rows = (catalog or load_catalog()).values()
    return list(dict.fromkeys(n for spec in rows for n in (spec.input_tensor, spec.bottleneck_tensor, *spec.alternates)))


def _fits(dim: int | None, want: int) -> bool:
    return dim is None or dim == want  # an unknown dimension cannot rule a row out


def _image_input(shape: Shape, size: int) -> bool:
    return shape is None or (len(shape) == 4 and _fits(shape[1], size) and _fits(shape[2], size) and _fits(shape[3], 3))


def _pooled(shape: Shape, features: int) -> bool:
    if shape is None:
        return True
    pooled = len(shape) == 2 or (len(shape) == 4 and _fits(shape[1], 1) and _fits(shape[2], 1))
    return pooled and _fits(shape[-1], features)


def _tensor(name: str | None) -> str | None:
    return name if name is None or ":" in name else f"{name}:0"


def match_backbones(
    shapes: Mapping[str, Shape], *, input_tensor: str | None = None, bottleneck_tensor: str | None = None,
    input_size: int | None = None, catalog: Mapping[str, BackboneSpec] | None = None,
) -> list[tuple[BackboneSpec, str]]:
    """The catalog rows a graph is, judged by its tensors.

    A row matches when the graph has the row's input tensor shaped ``[N, size, size, 3]`` with the
    row's ``input_size``, and its bottleneck (or one of its alternates) shaped ``[N,1,1,C]`` or
    ``[N,C]`` with the row's ``feature_size``: the MobileNet v1 widths share every name and differ
    in ``C``, the resolutions in ``size``. Dimensions the graph leaves unknown match any value.
    Options the user gave narrow the rows to those that agree with them.

    Args:
        shapes: tensor name → static shape, for the catalog's names the graph has
            (``graph.tensor_shapes(graph_def, catalog_tensor_names())``).
        input_tensor, bottleneck_tensor, input_size: what the user gave, or None.
        catalog: the rows to compare (default: :func:`load_catalog`).

    Returns:
        ``(row, bottleneck name found in the graph)`` for each matching row, in catalog order.
    """
    out = []
    for spec in (catalog or load_catalog()).values():
        if input_tensor is not None and _tensor(input_tensor) != spec.input_tensor:
            continue
        if input_size is not None and input_size != spec.input_size:
            continue
        if spec.input_tensor not in shapes or not _image_input(shapes[spec.input_tensor], spec.input_size):
            continue
        names = (spec.bottleneck_tensor, *spec.alternates)
        if bottleneck_tensor is not None:
            names = tuple(n for n in names if n == _tensor(bottleneck_tensor))
        found = next((n for n in names if n in shapes and _pooled(shapes[n], spec.feature_size)), None)
        if found:
            out.append((spec, found))
    return out


def recognise(graph_def, *, input_tensor: str | None = None, bottleneck_tensor: str | None = None,
              input_size: int | None = None) -> list[tuple[BackboneSpec, str]]:
    """:func:`match_backbones` on a GraphDef (imports TensorFlow to read its static shapes).

    Raises:
        GraphError: the graph does not import.
    """
    from pipeline.graph import tensor_shapes

    shapes = tensor_shapes(graph_def, catalog_tensor_names())
    return match_backbones(shapes, input_tensor=input_tensor, bottleneck_tensor=bottleneck_tensor,
                           input_size=input_size)
