"""Helpers shared by the sampler tests."""


def seven_task_rows(count: int) -> list[dict]:
    """Problems "What is a plus b?" with a + b = 7 for even rows and 8 for odd rows."""
    rows = []
    for i in range(count):
        total = 7 if i % 2 == 0 else 8
        a = i % total
        rows.append({"id": f"q{i}", "question": f"What is {a} plus {total - a}? Row {i}.", "answer": str(total)})
    return rows
