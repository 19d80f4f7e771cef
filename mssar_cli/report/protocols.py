"""Training protocols: the paper's (SPEC.md §4) and the short labels the report gives each.

A protocol is a run's values of the schema's protocol keys
(:func:`mssar_cli.recipe.protocol_keys`, flattened: ``"optim.lr"``). Runs of different
protocols are never averaged together; each protocol gets a label that is unique within a
dataset family ("160 ep (paper)", "5 ep, 6000 imgs", "4 ep, batch 64").
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

CIFAR = ("cifar10", "cifar100")

# The paper's training protocols (§4.1, SPEC.md §4), per network family, in flattened keys.
_SGD = {
    "optim.lr": 0.1,
    "optim.momentum": 0.9,
    "optim.nesterov": True,
    "optim.weight_decay": 1e-4,
    "optim.gamma": 0.1,
}
_FULL_DATA = {"data.augment": True, "data.subset": None, "data.test_subset": None}
PAPER_PROTOCOLS = {
    "cifar-resnet": {
        **_SGD,
        **_FULL_DATA,
        "data.batch_size": 128,
        "optim.epochs": 160,
        "optim.milestones": [80, 120],
    },
    "cifar-densenet": {
        **_SGD,
        **_FULL_DATA,
        "data.batch_size": 64,
        "optim.epochs": 300,
        "optim.milestones": [150, 225],
    },
    "imagenet-resnet": {
        **_SGD,
        **_FULL_DATA,
        "optim.lr": 0.6,
        "data.batch_size": 1024,
        "optim.epochs": 100,
        "optim.milestones": [30, 60, 90],
    },
}
# How a protocol setting is named in labels and captions.
SHORT_KEYS = {
    "data.batch_size": "batch",
    "data.augment": "augment",
    "optim.lr": "lr",
    "optim.momentum": "momentum",
    "optim.nesterov": "nesterov",
    "optim.weight_decay": "wd",
    "optim.milestones": "milestones",
    "optim.gamma": "gamma",
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def is_paper_protocol(family: str, protocol: dict) -> bool:
    """True when ``protocol`` is the paper's training protocol for the network ``family``."""
    reference = PAPER_PROTOCOLS.get(family)
    if reference is None:
        return False
    return all(_same(protocol.get(key), value) for key, value in reference.items())


def dataset_family(dataset: str) -> str:
    """CIFAR-10 and CIFAR-100 share protocol labels; every other dataset has its own."""
    return "cifar" if dataset in CIFAR else dataset


def _short_protocol(protocol: dict) -> str:
    text = f"{protocol.get('optim.epochs', '?')} ep"
    if protocol.get("data.subset"):
        text += f", {protocol['data.subset']} imgs"
    if protocol.get("data.test_subset"):
        text += f", {protocol['data.test_subset']} test imgs"
    return text


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_protocols(frame: pd.DataFrame) -> None:
    """Fill ``frame["protocol"]``: a short label per protocol, unique within a dataset family.

    The label is "<epochs> ep[, <subset> imgs][, <test subset> test imgs]"; when two protocols
    would share it, the settings in which they differ are appended; " (paper)" marks the paper's
    own protocol for the network's family (``frame["paper_protocol"]``).
    """
    if frame.empty:
        return
    labels: dict[tuple[str, str], str] = {}
    families = frame["dataset"].map(dataset_family)
    for family in families.unique():
        keys = frame.loc[families == family, "protocol_key"].unique()
        protocols = {key: json.loads(key) for key in keys}
        by_short: dict[str, list[str]] = {}
        for key, protocol in protocols.items():
            by_short.setdefault(_short_protocol(protocol), []).append(key)
        for short, group in by_short.items():
            differing = []
            if len(group) > 1:
                names = sorted({name for key in group for name in protocols[key]})
                differing = [
                    n for n in names if len({json.dumps(protocols[k].get(n)) for k in group}) > 1
                ]
            for key in group:
                extra = [
                    f"{SHORT_KEYS.get(n, n)} {value_text(protocols[key].get(n))}" for n in differing
                ]
                labels[(family, key)] = ", ".join([short, *extra])
    frame["protocol"] = [
        labels[(family, key)] + (" (paper)" if is_paper else "")
        for family, key, is_paper in zip(families, frame["protocol_key"], frame["paper_protocol"])
    ]
