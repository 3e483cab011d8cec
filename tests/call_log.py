"""Reading the log a stand-in interpreter writes when example scripts run under test: each
call is a `CALL <tag>` line followed by one line per argument."""


def read_call_log(path) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    with open(path) as f:
        for line in f.read().splitlines():
            if line.startswith("CALL "):
                calls.append((line.removeprefix("CALL "), []))
            else:
                calls[-1][1].append(line)
    return calls
