"""Reading one config value: its type and range, with errors that name the
key by its full path (config['zero_optimization']['stage'])."""
import math


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key's path."""


def path(parts) -> str:
    return "config" + "".join(f"[{p!r}]" for p in parts)


def fail(parts, message):
    raise ConfigError(f"{path(parts)}: {message}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_int(v, parts, minimum=None, allowed=None) -> int:
    """DeepSpeed configs write sizes as 5e8: an integral float is an int."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v):
        fail(parts, f"must be an integer, got {v!r}")
    if allowed is not None and v not in allowed:
        fail(parts, f"must be one of {', '.join(map(str, allowed))}, got {v}")
    if minimum is not None and v < minimum:
        fail(parts, f"must be >= {minimum}, got {v}")
    return v


def as_float(v, parts, minimum=None, positive=False, below=None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(parts, f"must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        fail(parts, f"must be finite, got {v}")
    if positive and v <= 0:
        fail(parts, f"must be > 0, got {v}")
    if minimum is not None and v < minimum:
        fail(parts, f"must be >= {minimum}, got {v}")
    if below is not None and v >= below:
        fail(parts, f"must be < {below}, got {v}")
    return v


def as_bool(v, parts) -> bool:
    if not isinstance(v, bool):
        fail(parts, f"must be true or false, got {v!r}")
    return v


def as_str(v, parts, allowed=None) -> str:
    if not isinstance(v, str):
        fail(parts, f"must be a string, got {v!r}")
    if allowed is not None and v not in allowed:
        fail(parts, f"must be one of {', '.join(repr(a) for a in allowed)}, got {v!r}")
    return v


def as_section(v, parts) -> dict:
    if not isinstance(v, dict):
        fail(parts, f"must be a JSON object, got {v!r}")
    return v


def _matches(key, patterns) -> bool:
    return any(key == p or (p.endswith("*") and key.startswith(p[:-1])) for p in patterns)


def check_keys(section, parts, known, inert=(), inert_found=None):
    """Every key must be known, or inert (accepted, recorded in inert_found)."""
    for key in section:
        if key in known:
            continue
        if _matches(key, inert):
            if inert_found is not None:
                inert_found.append(path(parts + [key]))
            continue
        fail(parts + [key], f"unknown key (allowed here: {', '.join(sorted(set(known) | set(inert)))})")


def is_switched_off(value) -> bool:
    if value in (None, False, "none", {}):
        return True
    if isinstance(value, dict):
        if "enabled" in value:
            return value["enabled"] is False
        if "device" in value:
            return value["device"] in (None, "none")
        return all(v in (None, False, 0, "none", {}) for v in value.values())
    return False


def disabled_only(value, parts, what):
    """A DeepSpeed feature zerofuse does not have is fine only when switched off."""
    if not is_switched_off(value):
        fail(parts, f"{what} is not supported by zerofuse; remove the key or switch the feature off")


def auto_values(raw, parts=()):
    """Paths of every "auto" value (Hugging Face Trainer's placeholders)."""
    found = []
    if isinstance(raw, dict):
        for k, v in raw.items():
            found += auto_values(v, parts + (k,))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            found += auto_values(v, parts + (i,))
    elif raw == "auto":
        found.append(path(list(parts)))
    return found
