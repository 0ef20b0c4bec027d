"""Reads a daemon's Prometheus endpoint over HTTP, as Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Series:
    """Every sample at http://127.0.0.1:<port>/metrics, by name and label set."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, metric: str, /, **labels: str) -> float | None:
    return series.get((metric, frozenset(labels.items())))


def labelled(series: Series, name: str) -> list[dict[str, str]]:
    """The label sets of every sample named `name`."""
    return [dict(labels) for n, labels in series if n == name]
