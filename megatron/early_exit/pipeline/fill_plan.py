"""Bubble-filling 1F1B, the plan: extra "fill" microbatches train the early exits in pipeline
bubbles.

The whole schedule is one explicit list of actions per stage (`PipelineSchedule.stages`),
computed by `plan_schedule`. The executor runs exactly that list, the table printer prints
it and the tests check it, so what runs, what is printed and what is tested cannot drift.

An action is ("F" | "B", microbatch id). Ids 0..M-1 are the iteration's microbatches,
ids M..M+K-1 are fill microbatches. Fill microbatch f has a depth d_f (the deepest stage
its forward reaches; that stage does not send on) and a floor k_f (the shallowest stage
its backward reaches; 0 for warm-up fills). Stage r runs f's forward when r <= d_f and its
backward when k_f <= r <= d_f; the backward's roots are the stage's own exit losses of f
plus, when r < d_f, the received gradient. Stages below the floor run f's forward without
autograd. Fills never reach the last stage (its forward would also run the LM head).

Placement (see docs/bubble_filling.md): warm-up fills run right before a stage's first
backward (the idle gap while stage r waits for the first gradient), forwards then
backwards; cool-down fill c runs its forward right before a stage's c-th cool-down backward
(stage 0 idles one forward time before each) and its backward after the stage's last
main backward (where deep stages idle while the gradient travels to stage 0).

This module plans only: it imports no torch and runs anywhere (config validation, the
schedule printer, the performance model). `bubble_filling.py` executes a plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.stage_split import StageSplit

F, B = "F", "B"
WARMUP, COOLDOWN = "warmup", "cooldown"
_EPS = 1e-9


@dataclass(frozen=True)
class Action:
    kind: str  # F or B
    mb: int  # microbatch id

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}"


@dataclass(frozen=True)
class FillMicrobatch:
    id: int  # microbatch id (>= num_microbatches)
    index: int  # 0..K-1: which fill samples it reads
    phase: str  # warmup or cooldown
    depth: int  # deepest stage of its forward
    floor: int  # shallowest stage of its backward


@dataclass(frozen=True)
class PipelineSchedule:
    num_stages: int
    num_microbatches: int
    fills: tuple[FillMicrobatch, ...]
    stages: tuple[tuple[Action, ...], ...]
    backward_forward_ratio: float
    model_time: float  # modelled iteration time (forward = 1, backward = ratio)
    base_time: float  # the same for plain 1F1B

    @property
    def num_fill(self) -> int:
        return len(self.fills)

    def count(self, phase: str) -> int:
        return sum(f.phase == phase for f in self.fills)

    def fill(self, mb: int) -> FillMicrobatch | None:
        return self.fills[mb - self.num_microbatches] if mb >= self.num_microbatches else None

    def depth(self, mb: int) -> int:
        f = self.fill(mb)
        return self.num_stages - 1 if f is None else f.depth

    def floor(self, mb: int) -> int:
        f = self.fill(mb)
        return 0 if f is None else f.floor

    def activation_order(self, stage: int) -> list[int]:
        """Ids whose activation `stage` sends to stage + 1, in send order."""
        return [a.mb for a in self.stages[stage] if a.kind == F and self.depth(a.mb) > stage]

    def gradient_order(self, stage: int) -> list[int]:
        """Ids whose input gradient `stage` sends to stage - 1, in send order."""
        return [a.mb for a in self.stages[stage] if a.kind == B and self.floor(a.mb) < stage]

    def table(self) -> str:
        return format_schedule(self)


# ---------------------------------------------------------------------------- building
def one_f_one_b(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Plain 1F1B action lists (the order of pipeline/schedules.py's forward_backward_1f1b)."""
    stages = []
    for r in range(num_stages):
        warm = min(num_stages - r - 1, num_microbatches)
        acts = [Action(F, i) for i in range(warm)]
        for i in range(num_microbatches - warm):
            acts += [Action(F, warm + i), Action(B, i)]
        acts += [Action(B, i) for i in range(num_microbatches - warm, num_microbatches)]
        stages.append(acts)
    return stages


def place_fills(
    num_stages: int, num_microbatches: int, fills: Sequence[FillMicrobatch]
) -> list[list[Action]]:
    base = one_f_one_b(num_stages, num_microbatches)
    out = []
    for r, acts in enumerate(base):
        warm = [f for f in fills if f.phase == WARMUP and f.depth >= r]
        cool = [f for f in fills if f.phase == COOLDOWN and f.depth >= r]
        first_b = acts.index(Action(B, 0)) if num_microbatches else len(acts)
        head = acts[:first_b] + [Action(F, f.id) for f in warm] + [Action(B, f.id) for f in warm]
        rest = acts[first_b:]
        n_cool = min(num_stages - r - 1, num_microbatches)  # cool-down backwards of stage r
        body, tail = rest[: len(rest) - n_cool], rest[len(rest) - n_cool :]
        new_tail: list[Action] = []
        for c, act in enumerate(tail):
            if c < len(cool):
                new_tail.append(Action(F, cool[c].id))
            new_tail.append(act)
        new_tail += [Action(F, f.id) for f in cool[len(tail) :]]
        new_tail += [Action(B, f.id) for f in cool if f.floor <= r]
        out.append(head + body + new_tail)
    return out


def simulate(
    stages: Sequence[Sequence[Action]],
    depth: Callable[[int], int],
    floor: Callable[[int], int],
    ratio: float,
) -> tuple[float, dict[tuple[int, Action], tuple[float, float]]]:
    """Run the action lists in a time model (forward 1, backward `ratio`, free messages).

    Returns the makespan and (start, end) per (stage, action). Raises RuntimeError on a
    dependency cycle (a schedule that would deadlock) or a missing counterpart action.
    """
    done: dict[tuple[int, Action], tuple[float, float]] = {}
    pos = [0] * len(stages)
    free = [0.0] * len(stages)
    remaining = sum(len(s) for s in stages)
    while remaining:
        progressed = False
        for r, acts in enumerate(stages):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                if a.kind == F:
                    dep = (r - 1, a) if r > 0 else None
                else:
                    dep = (r + 1, a) if r < depth(a.mb) else None
                    if (r, Action(F, a.mb)) not in done:
                        raise RuntimeError(f"stage {r}: backward of {a.mb} before its forward")
                if dep is not None and dep not in done:
                    break
                ready = done[dep][1] if dep is not None else 0.0
                start = max(free[r], ready)
                free[r] = start + (1.0 if a.kind == F else ratio)
                done[(r, a)] = (start, free[r])
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(acts[pos[r]]) for r, acts in enumerate(stages) if pos[r] < len(acts)}
            raise RuntimeError(f"pipeline schedule deadlocks; next actions per stage: {stuck}")
    for (r, a), _ in list(done.items()):
        if a.kind == B and r > floor(a.mb) and (r - 1, a) not in done:
            raise RuntimeError(f"stage {r - 1} never receives the gradient of {a.mb}")
    return max(free), done


def _build(P: int, M: int, fills: list[FillMicrobatch], ratio: float, base_time: float):
    stages = place_fills(P, M, fills)
    by_id = {f.id: f for f in fills}
    makespan, _ = simulate(
        stages,
        lambda mb: by_id[mb].depth if mb in by_id else P - 1,
        lambda mb: by_id[mb].floor if mb in by_id else 0,
        ratio,
    )
    return PipelineSchedule(
        P, M, tuple(fills), tuple(tuple(s) for s in stages), ratio, makespan, base_time
    )


def exit_stages(
    exit_layers: Sequence[int],
    num_layers: int,
    num_stages: int,
    split: StageSplit | None = None,
) -> list[int]:
    """Pipeline stages (0-based) owning the given 1-based exit layers.

    Follows the model's layer split (stage_split.py): even by default, or the given uneven
    `split`; a split megatron-core would refuse is refused rather than mapped wrongly.
    """
    split = split or StageSplit(num_layers, num_stages)
    split.counts()  # ConfigError naming the flags
    bad = [n for n in exit_layers if not 1 <= n <= num_layers]
    if bad:
        raise ConfigError(f"--exit-layer-nums {bad} outside 1..{num_layers}")
    return sorted({split.stage_of(n) for n in exit_layers})


def plan_schedule(
    num_stages: int,
    num_microbatches: int,
    stages_with_exits: Sequence[int],
    backward_forward_ratio: float = 2.0,
    num_warmup: int | None = None,
    num_cooldown: int | None = None,
) -> PipelineSchedule:
    """Choose the fill microbatches and return the full schedule.

    A fill may use at most the idle time each stage it touches has in plain 1F1B (the
    time model's bubble). Counts of None are automatic: as many fills as fit without
    lengthening the modelled iteration. Given counts must fit in the bubbles (else
    ConfigError). Each fill takes the placement with the shortest modelled iteration;
    ties prefer deeper fills and, in the cool-down, backward through more stages.
    """
    P, M, rho = num_stages, num_microbatches, float(backward_forward_ratio)
    if P < 2:
        raise ConfigError(
            "--fill-explicit-bubbles fills pipeline bubbles and needs "
            "--pipeline-model-parallel-size >= 2"
        )
    if not rho > 0:
        raise ConfigError(f"--backward-forward-ratio must be > 0, got {backward_forward_ratio}")
    for name, n in (
        ("--num-fill-warmup-microbatches", num_warmup),
        ("--num-fill-cooldown-microbatches", num_cooldown),
    ):
        if n is not None and n < 0:
            raise ConfigError(f"{name} must be >= 0, got {n}")
    reachable = sorted(s for s in set(stages_with_exits) if s <= P - 2)
    if not reachable:
        raise ConfigError(
            "--fill-explicit-bubbles: fill microbatches train exits on pipeline stages 0.."
            f"{P - 2} (never the last stage), but no --exit-layer-nums exit lives there"
        )
    base_time, _ = simulate(one_f_one_b(P, M), lambda mb: P - 1, lambda mb: 0, rho)
    budget = [base_time - M * (1.0 + rho)] * P  # each stage's idle time in plain 1F1B
    fills: list[FillMicrobatch] = []
    schedule = _build(P, M, fills, rho, base_time)

    def candidates(phase: str):
        if phase == WARMUP:
            for d in reversed(reachable):
                yield d, 0
        else:
            for k in range(P - 1):
                for d in reversed(reachable):
                    if d >= k and any(k <= s <= d for s in reachable):
                        yield d, k

    def cost(stage: int, d: int, k: int) -> float:
        if stage > d:
            return 0.0
        return 1.0 + (rho if stage >= k else 0.0)

    for phase, wanted in ((WARMUP, num_warmup), (COOLDOWN, num_cooldown)):
        added = 0
        while wanted is None or added < wanted:
            best = None
            for d, k in candidates(phase):
                if any(cost(r, d, k) > budget[r] + _EPS for r in range(P)):
                    continue
                f = FillMicrobatch(M + len(fills), len(fills), phase, d, k)
                trial = _build(P, M, [*fills, f], rho, base_time)
                # Ties keep the first candidate: deepest, then (cool-down) lowest floor.
                if best is None or trial.model_time < best[1].model_time - _EPS:
                    best = (f, trial)
            if best is None or (wanted is None and best[1].model_time > base_time + _EPS):
                break
            f, schedule = best
            fills.append(f)
            for r in range(P):
                budget[r] -= cost(r, f.depth, f.floor)
            added += 1
        if wanted is not None and added < wanted:
            flag = (
                "--num-fill-warmup-microbatches"
                if phase == WARMUP
                else "--num-fill-cooldown-microbatches"
            )
            raise ConfigError(
                f"{flag} {wanted} is larger than the pipeline bubbles can hold: with "
                f"{P} stages, {M} microbatches, --backward-forward-ratio {rho:g} and the "
                f"fills before it, only {added} fit (a bubble of stage r holds at most "
                f"{base_time - M * (1 + rho):g} forward times of idle work per iteration)"
            )
    return schedule


# ---------------------------------------------------------------------------- printing
def format_schedule(schedule: PipelineSchedule) -> str:
    """Per stage, the action order: F3/B3 main, f8/b8 fill (forward / backward)."""
    s = schedule
    lines = [
        f"1F1B pipeline schedule: {s.num_stages} stages, {s.num_microbatches} microbatches, "
        f"{s.count(WARMUP)} warm-up + {s.count(COOLDOWN)} cool-down fill microbatches",
    ]
    for f in s.fills:
        lines.append(
            f"  fill {f.id} ({f.phase}, samples slot {f.index}): forward stages 0..{f.depth}, "
            f"backward stages {f.floor}..{f.depth}"
        )
    lines.append(
        f"  modelled iteration time (forward=1, backward={s.backward_forward_ratio:g}): "
        f"{s.model_time:g} vs {s.base_time:g} without filling"
    )
    for r, acts in enumerate(s.stages):
        cells = []
        for a in acts:
            name = a.kind if s.fill(a.mb) is None else a.kind.lower()
            if a.kind == F and s.fill(a.mb) is not None and r < s.floor(a.mb):
                name = "n"  # forward without autograd (below the fill's backward floor)
            cells.append(f"{name}{a.mb}")
        lines.append(f"stage {r}: " + " ".join(cells))
    lines.append("(F/B: main forward/backward; f/b: fill forward/backward; n: no-grad forward)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- samples
def fill_sample_indices(
    iteration: int,
    fill_index: int,
    num_fill: int,
    train_iters: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> list[int]:
    """Global sample indices read by one fill microbatch.

    Fill samples come after all `train_iters * global_batch_size` training samples, so
    the main microbatches read exactly what plain 1F1B reads; slot (iteration, DP rank,
    fill index) is unique, so DP replicas and iterations never share fill samples.
    """
    slot = (iteration * data_parallel_size + data_parallel_rank) * num_fill + fill_index
    first = train_iters * global_batch_size + slot * micro_batch_size
    return list(range(first, first + micro_batch_size))


# ---------------------------------------------------------------------------- run config
def plan_for_run(run) -> PipelineSchedule | None:
    """The run's bubble-filling schedule, or None when filling is off."""
    fill = run.fill
    if not fill.fill_explicit_bubbles:
        return None
    if run.parallel.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            "--fill-explicit-bubbles does not support virtual pipeline stages; drop "
            "--num-layers-per-virtual-pipeline-stage"
        )
    return plan_schedule(
        run.parallel.pipeline_model_parallel_size,
        run.training.num_microbatches(run.parallel.data_parallel_size),
        exit_stages(
            run.exits.exit_layer_nums,
            run.model.num_layers,
            run.parallel.pipeline_model_parallel_size,
            run.parallel.stage_split(run.model.num_layers),
        ),
        fill.backward_forward_ratio,
        fill.num_fill_warmup_microbatches,
        fill.num_fill_cooldown_microbatches,
    )


def schedule_for_run(run) -> PipelineSchedule:
    """What the run executes per iteration: the filled schedule or plain 1F1B."""
    planned = plan_for_run(run)
    if planned is not None:
        return planned
    P = run.parallel.pipeline_model_parallel_size
    M = run.training.num_microbatches(run.parallel.data_parallel_size)
    ratio = run.fill.backward_forward_ratio
    return _build(
        P, M, [], ratio, simulate(one_f_one_b(P, M), lambda mb: P - 1, lambda mb: 0, ratio)[0]
    )
