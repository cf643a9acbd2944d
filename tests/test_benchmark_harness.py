"""benchmarks/harness.py: ratios within the run-to-run spread of 1 are reported as parity, not as a win or a loss."""

from benchmark_modules import load_benchmark

harness = load_benchmark("harness")
format_ratio, Measurement, Row = harness.format_ratio, harness.Measurement, harness.Row


def test_ratios_within_five_percent_of_one_read_as_parity():
    assert format_ratio(1.04) == "1.04x (parity)"
    assert format_ratio(0.96) == "0.96x (parity)"
    assert format_ratio(1.07) == "1.07x"
    assert format_ratio(0.93) == "0.93x"


def test_the_table_marks_parity_per_peer():
    row = Row("case", "ms", higher_is_better=False, results=[
        Measurement("fastlm", 10.0), Measurement("near", 10.3), Measurement("slow", 20.0)])
    table_row = next(line for line in harness.format_table("t", [row]).splitlines() if line.startswith("| case | ms"))
    assert table_row.endswith("| 1.03x (parity) | 2.00x |")
