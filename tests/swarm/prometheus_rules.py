"""Prometheus naming conventions, checked on a real scrape: one function walks every
metric family and returns what breaks them."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

NON_BASE_UNITS = ("_ms", "_milliseconds", "_microseconds", "_minutes", "_hours", "_days", "_kb", "_mb", "_gb",
                  "_kilobytes", "_megabytes", "_gigabytes", "_percent", "_bits")
UNBOUNDED_LABELS = {"peer", "peer_id", "address", "maddr", "host", "ip"}


def parse(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def convention_errors(text: str, modules: set[str]) -> list[str]:
    """Every way the scraped families break the conventions (empty: all good)."""
    errors = []
    families = parse(text)
    build = families.get("p2ptrain_build_info")
    if build is None or not build.samples or "version" not in build.samples[0].labels:
        errors.append("no p2ptrain_build_info with a version label")
    for name, family in families.items():
        if not name.startswith("p2ptrain_"):
            errors.append(f"{name}: no p2ptrain_ prefix")
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            errors.append(f"{name}: not snake_case")
        if any(name.endswith(u) or f"{u}_" in name for u in NON_BASE_UNITS):
            errors.append(f"{name}: not in base units")
        if family.type != "counter" and name.endswith("_total"):
            errors.append(f"{name}: a {family.type} ending in _total")
        if not family.documentation:
            errors.append(f"{name}: no help text")
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_total"):
                errors.append(f"{sample.name}: counter sample without _total")
            if name.endswith("_ratio") and not 0.0 <= sample.value <= 1.0:
                errors.append(f"{sample.name}: ratio {sample.value} outside 0..1")
            for label, value in sample.labels.items():
                if label in UNBOUNDED_LABELS:
                    errors.append(f"{sample.name}: unbounded label {label}")
                if "12D3KooW" in value or value.startswith("/ip4/") or value.startswith("/ip6/"):
                    errors.append(f"{sample.name}: a peer id or address as a label value ({value})")
                if label == "module" and value not in modules:
                    errors.append(f"{sample.name}: module {value!r} is not in the grid")
    return errors
