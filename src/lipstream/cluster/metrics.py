"""Every replica's Prometheus metrics as one exposition: each sample gets a `replica` label, and the
samples of one metric family from all replicas are listed under that family once (the text format
allows each family one HELP/TYPE block)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LABEL = "replica"


class _Families:
    """A collector that yields given metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_metrics(texts: Mapping[str, str]) -> bytes:
    """{replica name: its metrics in the text format} -> one exposition (bytes, text format 0.0.4)."""
    families: dict[tuple[str, str], Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get((family.name, family.type))
            if merged is None:
                merged = families[(family.name, family.type)] = Metric(family.name, family.documentation,
                                                                        family.type, family.unit)
            merged.samples.extend(Sample(s.name, {**s.labels, LABEL: replica}, s.value, s.timestamp, s.exemplar)
                                  for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
