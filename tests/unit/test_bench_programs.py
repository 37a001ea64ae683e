"""bench/'s '+ socket table' variant of figure 1: serve's program with its
histogram functions emptied, everything else as it is."""

import pytest

from bench.programs import HISTOGRAM_FUNCTIONS, without_histograms
from tracer.probe import bpf_source


def test_serve_program_without_histograms_keeps_everything_else():
    source = bpf_source("serve").read_text()
    variant = without_histograms(source)
    for name in HISTOGRAM_FUNCTIONS:
        definition = variant.index(f"static __always_inline void {name}(")
        body = variant[variant.index("{", definition):]
        assert body.startswith("{}\n"), name
    assert "duration_buckets.lookup" not in variant
    # only the two bodies went: the handler still calls them, the maps stay
    assert variant.count("observe_state(") == source.count("observe_state(")
    assert variant.count("MMAPABLE_ARRAY(") == source.count("MMAPABLE_ARRAY(")
    assert len(source) - len(variant) < 600


def test_a_serve_program_without_the_functions_is_refused():
    with pytest.raises(RuntimeError, match="observe_state"):
        without_histograms("int on_state_change(void *ctx) { return 0; }\n")
