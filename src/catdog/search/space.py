"""The search space: a YAML file whose entries are dotted params.yaml keys, each sampled per trial.

    train.mode: [features, full]                        # a choice list
    train.epochs: {low: 5, high: 30}                    # an int range (both bounds ints)
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # a float range, log scale
    train.logistic_c: {low: 0.001, high: 1.0, log: true, when: {train.head: logistic}}

    model:                                              # a choice among named sets of values
      choices:
        lite2-features: {train.arch: efficientnet_lite2, train.mode: features}
        cnn-64: {train.arch: simple_cnn, train.pretrained: false, train.mode: full, train.image_size: 64}

``choices:`` spells a choice list as a mapping (to add ``when:``); a key without a dot names a set
choice, whose values go together (an input size and its cache size, an architecture and its mode).
``when`` maps keys (or set names) to a value or a list of values: the entry is sampled only when each
holds one of them, the value sampled in this trial when it is an earlier entry, else params.yaml's
(Optuna's define-by-run). Every
entry is checked against params.yaml's validation before any trial: an unknown key, an empty
range or a value of the wrong type stops in one line naming the entry.

``start:`` (a reserved name) lists known-good points tried first, in order, before the sampler draws
(Optuna's ``enqueue_trial``, as Ultralytics' tune starts from the defaults): each maps entries to one
of their values; the entries a point leaves out are sampled.

    start:
      - {model: cnn-64, train.epochs: 20}
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from pydantic import ValidationError

from catdog.core.errors import CatdogError
from catdog.core.params import Params, describe_error

_RANGE_KEYS = {"low", "high", "log", "step", "when"}
_CHOICE_KEYS = {"choices", "when"}
START = "start"


class SpaceError(CatdogError):
    """The search space file is unreadable or one of its entries is wrong."""


@dataclass(frozen=True)
class Entry:
    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict[str, tuple] = field(default_factory=dict)
    sets: dict[str, dict] | None = None  # a set choice: name -> {params key: value}

    def applies(self, values: dict[str, object]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> object:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def allows(self, value: object) -> bool:
        if self.sets is not None or self.choices is not None:
            return value in (self.sets or self.choices)
        return isinstance(value, int | float) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Space:
    entries: list[Entry]
    start: list[dict[str, object]]  # points tried first: entry key -> value (Optuna's fixed params)


def load_space(path: Path, base: dict) -> Space:
    """The entries of the space file ``path``, in file order, each checked against ``base`` (params.yaml),
    and its start points, each checked against the entries."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpaceError(f"search space {path} not found") from None
    except yaml.YAMLError as exc:
        raise SpaceError(f"search space {path} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"search space {path} must map params.yaml keys (train.lr: ...) to their values")
    start = raw.pop(START, None) or []
    entries: list[Entry] = []
    for key, spec in raw.items():
        try:
            entries.append(_entry(str(key), spec, base, list(map(str, raw)), [e.key for e in entries]))
        except SpaceError as exc:
            raise SpaceError(f"search space {path}: {key}: {exc}") from None
    if not entries:
        raise SpaceError(f"search space {path} has no entries: only {START}")
    try:
        return Space(entries, _start_points(start, entries))
    except SpaceError as exc:
        raise SpaceError(f"search space {path}: {START}{exc}") from None


def sample(trial: optuna.Trial, entries: list[Entry], base_flat: dict[str, object]) -> dict[str, object]:
    """The params.yaml values of this trial: each entry whose conditions hold, sampled in file order."""
    values: dict[str, object] = {}
    chosen_sets: dict[str, str] = {}
    for entry in entries:
        if not entry.applies({**base_flat, **values, **chosen_sets}):
            continue
        if entry.sets is None:
            values[entry.key] = entry.suggest(trial)
        else:
            chosen_sets[entry.key] = trial.suggest_categorical(entry.key, list(entry.sets))
            values.update(entry.sets[chosen_sets[entry.key]])
    return values


def with_values(base: dict, values: dict[str, object]) -> dict:
    """params.yaml's mapping ``base`` with the dotted ``values`` set (``base`` left as it is)."""
    raw = {section: dict(options) if isinstance(options, dict) else options for section, options in base.items()}
    for key, value in values.items():
        section, _, option = key.partition(".")
        raw[section][option] = value
    return raw


def _entry(key: str, spec: object, base: dict, space_keys: list[str], earlier: list[str]) -> Entry:
    if "." not in key:
        return _set_entry(key, spec, base, space_keys, earlier)
    _known_key(key, base)
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise SpaceError(f"must be a choice list or a range {{low: .., high: ..}}, got {spec!r}")
    when = _conditions(spec.get("when") or {}, base, space_keys, earlier)
    if "choices" in spec:
        _only(spec, _CHOICE_KEYS)
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"choices must be a non-empty list, got {choices!r}")
        for value in choices:
            _valid(base, key, value)
        return Entry(key, choices=tuple(choices), when=when)
    _only(spec, _RANGE_KEYS)
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    numbers = (low, high) + (() if step is None else (step,))
    if not all(isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) for n in numbers):
        raise SpaceError(f"a range needs numbers low and high (and step), got low {low!r}, high {high!r}")
    if not low < high:
        raise SpaceError(f"empty range: low {low} must be below high {high}")
    if not isinstance(log, bool) or (log and low <= 0) or (log and step is not None):
        raise SpaceError("log must be true or false; a log range needs low > 0 and no step")
    _valid(base, key, low)
    _valid(base, key, high)
    return Entry(key, low=low, high=high, log=log, step=step, when=when)


def _set_entry(name: str, spec: object, base: dict, space_keys: list[str], earlier: list[str]) -> Entry:
    sets = spec.get("choices") if isinstance(spec, dict) else None
    if not isinstance(sets, dict) or not sets or not all(isinstance(v, dict) and v for v in sets.values()):
        raise SpaceError("a name without a dot is a set choice: {choices: {NAME: {params.key: value, ...}, ...}}")
    _only(spec, _CHOICE_KEYS)
    for values in sets.values():
        for key, value in values.items():
            _known_key(str(key), base)
            _valid(base, str(key), value)
    when = _conditions(spec.get("when") or {}, base, space_keys, earlier)
    return Entry(name, sets={str(k): {str(p): v for p, v in values.items()} for k, values in sets.items()}, when=when)


def _start_points(start: object, entries: list[Entry]) -> list[dict[str, object]]:
    if not isinstance(start, list) or not all(isinstance(point, dict) and point for point in start):
        raise SpaceError(": must be a list of points, each {entry: value, ...}")
    by_key = {entry.key: entry for entry in entries}
    for number, point in enumerate(start):
        for key, value in point.items():
            if key not in by_key:
                raise SpaceError(f"[{number}]: {key}: not an entry of the space")
            if not by_key[key].allows(value):
                raise SpaceError(f"[{number}]: {key}: {value!r} is not one of its values")
    return [{str(key): value for key, value in point.items()} for point in start]


def _known_key(key: str, base: dict) -> None:
    section, _, option = key.partition(".")
    if not isinstance(base.get(section), dict) or option not in base[section]:
        known = [f"{s}.{o}" for s, options in base.items() if isinstance(options, dict) for o in options]
        close = difflib.get_close_matches(key, known, n=1)
        raise SpaceError("unknown key: params.yaml has no such key" + (f" (did you mean {close[0]}?)" if close else ""))


def _conditions(when: object, base: dict, space_keys: list[str], earlier: list[str]) -> dict[str, tuple]:
    if not isinstance(when, dict):
        raise SpaceError(f"when must map keys to values, got {when!r}")
    conditions = {}
    for key, allowed in when.items():
        if key not in space_keys or "." in str(key):  # a set's name is known from the space itself
            _known_key(str(key), base)
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        conditions[str(key)] = values
        if key in space_keys and key not in earlier:  # define-by-run: its value must be known by then
            raise SpaceError(f"when: {key} is sampled after this entry: list {key} first")
    return conditions


def _only(spec: dict, allowed: set[str]) -> None:
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SpaceError(f"unknown field(s) {extra}: allowed {sorted(allowed)}")


def _valid(base: dict, key: str, value: object) -> None:
    """What params validation says of the dotted ``key`` set to ``value`` in ``base``: its own type and
    range, not how it combines with other keys (a combination is pruned per trial, not refused here)."""
    section, _, option = key.partition(".")
    try:
        Params.model_validate({**base, section: {**base.get(section, {}), option: value}})
    except ValidationError as exc:
        own = [error for error in exc.errors() if tuple(error["loc"][:2]) == (section, option)]
        if own:
            raise SpaceError(f"wrong value for params.yaml: {'; '.join(describe_error(e) for e in own)}") from None
