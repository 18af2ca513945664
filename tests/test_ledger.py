"""The run's ledger table: numbers are never cut with an ellipsis, however narrow the terminal."""

from effitrain.ledger import ledger_table, render_text

SUMMARY = {
    "recipe": "distill_bert", "device": "cpu", "status": "completed", "headline": "accuracy",
    "precision": {"requested": "auto", "used": "fp32", "why": "cpu"},
    "stages": [
        {"name": "teacher", "kind": "train", "metrics": {"accuracy": 0.979, "params": 22715141, "nonzero_params": 22715138, "sparsity": 0.0,
                                                          "size_bytes": 90872540, "latency_ms": 869.196, "seconds": 436.2}},
        {"name": "int8", "kind": "quantize", "metrics": {"accuracy": 0.9731, "params": 17391749, "nonzero_params": 17196263, "sparsity": 0.014,
                                                          "size_bytes": 17721412, "latency_ms": 66.478, "seconds": 0.1,
                                                          "backend": "x86_dynamic int8 x20 + weight_only int8 x3"}},
    ],
}


def test_numbers_are_whole_at_160_columns_and_never_cut() -> None:
    wide = render_text(ledger_table(SUMMARY), width=160)
    assert "17,391,749" in wide and "22,715,141" in wide and "x86_dynamic" in wide
    for width in (160, 120, 90):
        assert "…" not in render_text(ledger_table(SUMMARY), width=width), width
