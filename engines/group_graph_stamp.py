"""What each group graph says about itself, so a manifest cannot quietly disagree with its graphs.

The manifest is the root of trust of a build: it hashes every file, but nothing hashes the
manifest. An edit that keeps it self-consistent (another timestep->group table, another
sample size or channel count) would pass every check and make the runner send timesteps to
the wrong group's scales. So the export stamps each group graph (ONNX `metadata_props`) with
its group id, the group count, the sha256 of the whole timestep table, the model's sample
size and channels; the graphs are hashed by the manifest, and `check_graph_stamps` compares
the two on load. Graphs without a stamp (builds made before it) are accepted as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from engines.errors import AdpdmError
from engines.file_io import sha256_json

PREFIX = "adpdm."


def table_sha256(table: Sequence[int]) -> str:
    return sha256_json([int(x) for x in table])


def stamp_values(group: int, num_groups: int, table: Sequence[int], sample_size: Sequence[int],
                 in_channels: int) -> dict[str, str]:
    """The metadata a group graph carries (string values, as ONNX metadata_props hold)."""
    return {
        PREFIX + "group": str(int(group)),
        PREFIX + "num_groups": str(int(num_groups)),
        PREFIX + "timestep_table_sha256": table_sha256(table),
        PREFIX + "sample_size": json.dumps([int(x) for x in sample_size]),
        PREFIX + "in_channels": str(int(in_channels)),
    }


def stamp(model: Any, values: Mapping[str, str]) -> Any:
    """Set `values` as metadata_props of an onnx.ModelProto (replacing earlier stamps)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def read_stamp(graph: Path) -> dict[str, str]:
    """The adpdm metadata of an ONNX graph file (weights not loaded); {} when it has none."""
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # not ONNX at all: no stamp to compare (its hash is the manifest's; loading it fails clearly)
        return {}
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


def check_graph_stamps(manifest: Any) -> None:
    """Every stamped ONNX group graph of `manifest` (loaded from its folder) agrees with it: one
    AdpdmError line naming the graph and the field otherwise."""
    root = manifest.root
    if root is None:
        return
    m = manifest
    want_common = stamp_values(0, m.num_groups, m.timestep_to_group, m.model.sample_size, m.model.in_channels)
    for group in m.groups:
        for name in sorted(set(group.graphs.values())):
            got = read_stamp(Path(root) / name) if name.endswith(".onnx") else {}
            if not got:  # unstamped: the FP graph, or a build made before stamps
                continue
            want = {**want_common, PREFIX + "group": str(group.id)}
            for key, value in want.items():
                if key in got and got[key] != value:
                    field = key[len(PREFIX):]
                    raise AdpdmError(f"manifest disagrees with {name} on {field} (graph: {got[key]}, manifest: "
                                     f"{value}): the manifest was edited or mixed with another build; rebuild")
