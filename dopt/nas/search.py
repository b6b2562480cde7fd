"""The NASEA search: constraint costs, the NSGA-II study, and the evaluation loop.

The study is Optuna's (``NSGAIISampler``, two objectives: the user's metric up, the
constraint metric down) kept in a journal file in the output's ``nas_state/`` folder.
That file is the whole search state: an interrupted run re-run with the same command
continues where it stopped, and several processes (``--workers N``, or ``dopt nas
--search-only`` on other machines sharing the folder) add trials to the same study.
Candidates over ``constraint_value`` are told ``PRUNED`` before any evaluation, so they
never enter a generation.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from ..errors import DoptError
from .latency import estimate_onnx
from .space import BLOCKS, SearchSpace

STUDY_NAME = "nasea"
#: consecutive rejections (candidates over budget) after which the budget is called too tight
MAX_REJECTIONS_FACTOR = 25
UNITS = {"size": "parameters", "flops": "multiply-accumulates", "latency": "ms"}


def constraint_label(cfg) -> str:
    if cfg.constraint_type == "latency":
        return f"estimated {cfg.latency_precision.upper()} latency (ms)"
    return {"size": "parameters", "flops": "MACs"}[cfg.constraint_type]


class Costs:
    """Parameters, MACs and the cost-model latency of candidates, cached by architecture."""

    def __init__(self, backend, cfg, profile, space: SearchSpace, tmp_dir: Path):
        self.backend, self.cfg, self.profile, self.space = backend, cfg, profile, space
        self.tmp_dir = Path(tmp_dir)
        self.cache: dict[str, dict] = {}

    def __call__(self, arch, *, latency: bool) -> dict:
        key = self.space.key(arch)
        c = self.cache.setdefault(key, {})
        if "params" not in c:
            c.update(self.backend.measure(arch))
        if latency and "latency_int8_ms" not in c:
            fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=self.tmp_dir)
            os.close(fd)
            try:
                self.backend.export_onnx(arch, Path(tmp))
                c.update(estimate_onnx(tmp, self.profile))
            finally:
                os.unlink(tmp)
        return c

    def constraint(self, arch) -> float:
        t = self.cfg.constraint_type
        c = self(arch, latency=t == "latency")
        if t == "size":
            return float(c["params"])
        if t == "flops":
            return float(c["macs"])
        return float(c[f"latency_{self.cfg.latency_precision}_ms"])


def cheapest(space: SearchSpace, costs: Costs) -> tuple[tuple, float]:
    """The cheapest candidate found: uniform choices, narrowest widths, with and without
    identity layers; for size and FLOPs then one pass of per-layer improvement."""
    cands = []
    for b in BLOCKS:
        if b == "identity":
            continue
        cands.append(space.uniform(b))
        cands.append(space.decode([("identity", lay.widths[0]) if "identity" in lay.blocks
                                   else (b if b in lay.blocks else "dwsep", lay.widths[0])
                                   for lay in space.layers]))
    best = min(cands, key=costs.constraint)
    if costs.cfg.constraint_type != "latency":
        choice = [(b, cout) for b, _cin, cout, _s in best]
        for i, lay in enumerate(space.layers):
            for b in lay.blocks:
                for w in (lay.widths if b != "identity" else lay.widths[:1]):
                    trial = choice[:i] + [(b, w)] + choice[i + 1:]
                    arch = space.decode(trial)
                    if costs.constraint(arch) < costs.constraint(best):
                        best, choice = arch, trial
    return best, costs.constraint(best)


def check_feasible(cfg, space: SearchSpace, costs: Costs) -> tuple:
    """Stop at once, naming the smallest achievable value, when nothing meets the budget."""
    arch, value = cheapest(space, costs)
    if value > cfg.constraint_value:
        unit = UNITS[cfg.constraint_type]
        what = (f"estimated {cfg.latency_precision.upper()} latency"
                if cfg.constraint_type == "latency" else cfg.constraint_type)
        raise DoptError(
            f"no candidate of the search space meets constraint_value {cfg.constraint_value:g} "
            f"{unit}: the smallest achievable {what} is {value:.6g} {unit} (candidate "
            f"{space.key(arch)})", file=cfg.path,
            field=f"scenario.strategy.constraint.constraint_value (line "
                  f"{cfg.lines.get('scenario.strategy.constraint.constraint_value')})",
            hint=f"raise constraint_value to at least {value:.6g}, or make the skeleton "
                 f"smaller (fewer or narrower filters, larger strides, a lighter PreNet/PostNet)")
    return arch, value


# --- the study ------------------------------------------------------------------------------


def _optuna():
    try:
        import optuna
    except ImportError:
        raise DoptError("the architecture search needs the Python package 'optuna'",
                        hint="pip install 'dopt[nas]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(state_dir: Path, cfg, worker_index: int = 0):
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(str(Path(state_dir) / "study.journal")))
    sampler = optuna.samplers.NSGAIISampler(population_size=cfg.pop_size,
                                            seed=cfg.seed + 7919 * worker_index)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler,
                               directions=["maximize", "minimize"], load_if_exists=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def fail_stale_trials(study) -> int:
    """Trials left RUNNING by a process of this machine that no longer exists (killed mid
    evaluation) become FAIL, so their slots are sampled again."""
    optuna = _optuna()
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid, h = t.user_attrs.get("pid"), t.user_attrs.get("host")
        if pid is None or (h == host and not _alive(int(pid))):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            n += 1
    return n


def seed_study(study, space: SearchSpace, arch) -> None:
    """A new study starts with the cheapest candidate, so a feasible one is always in the
    first generation however tight the budget."""
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(space.to_params(arch))


def _suggest(trial, space: SearchSpace) -> tuple:
    params = {}
    for i, lay in enumerate(space.layers):
        params[f"L{i}_block"] = trial.suggest_categorical(f"L{i}_block", list(lay.blocks))
        params[f"L{i}_width"] = trial.suggest_categorical(f"L{i}_width", list(lay.widths))
    return space.from_params(params)


def search(study, cfg, space: SearchSpace, backend, costs: Costs, *, worker_index: int = 0,
           max_evals: int | None = None, progress: bool = True, log=print) -> dict:
    """Ask, reject or evaluate, tell, until the study holds ``pop_size x generation_num``
    evaluated candidates. Returns counts of this process's work."""
    optuna = _optuna()
    from tqdm import tqdm
    S = optuna.trial.TrialState
    target = cfg.pop_size * cfg.generation_num
    max_rejects = MAX_REJECTIONS_FACTOR * cfg.pop_size
    done = {"evaluated": 0, "reused": 0, "rejected": 0}
    rejected_row = 0
    host, pid = socket.gethostname(), os.getpid()
    complete = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    bar = tqdm(total=target, initial=min(len(complete), target), desc="search",
               disable=not progress, dynamic_ncols=True)
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            complete = [t for t in trials if t.state == S.COMPLETE]
            running = sum(t.state == S.RUNNING for t in trials)
            bar.n = min(len(complete), target)
            bar.refresh()
            if len(complete) + running >= target:
                break
            if max_evals is not None and done["evaluated"] >= max_evals:
                break
            known = {t.user_attrs["key"]: t for t in complete if "key" in t.user_attrs}
            trial = study.ask()
            trial.set_user_attr("pid", pid)
            trial.set_user_attr("host", host)
            trial.set_user_attr("worker", worker_index)
            try:
                arch = _suggest(trial, space)
                key = space.key(arch)
                trial.set_user_attr("key", key)
                if key in known:  # the same network again: reuse its numbers
                    old = known[key]
                    for k, v in old.user_attrs.items():
                        if k not in ("pid", "host", "worker", "key"):
                            trial.set_user_attr(k, v)
                    trial.set_user_attr("reused_from", old.number)
                    study.tell(trial, list(old.values))
                    done["reused"] += 1
                    continue
                value = costs.constraint(arch)
                trial.set_user_attr("constraint", value)
                if value > cfg.constraint_value:
                    study.tell(trial, state=S.PRUNED)
                    done["rejected"] += 1
                    rejected_row += 1
                    if rejected_row >= max_rejects:
                        raise DoptError(
                            f"the last {rejected_row} candidates the search proposed were all "
                            f"over constraint_value {cfg.constraint_value:g}: the budget leaves "
                            f"too few networks to search among", file=cfg.path,
                            field="scenario.strategy.constraint.constraint_value",
                            hint="raise constraint_value a little (the results so far are kept "
                                 "and the search resumes)")
                    continue
                rejected_row = 0
                metric = backend.evaluate(arch)
                c = costs(arch, latency=True)
                for k in ("params", "macs", "latency_fp16_ms", "latency_int8_ms"):
                    trial.set_user_attr(k, c[k])
                trial.set_user_attr("accuracy", metric)
                study.tell(trial, [metric, value])
                done["evaluated"] += 1
                bar.set_postfix(acc=f"{metric:.4f}", rejected=done["rejected"])
            except BaseException:
                if not study._storage.get_trial(trial._trial_id).state.is_finished():
                    study.tell(trial, state=S.FAIL)
                raise
    finally:
        bar.close()
    return done
