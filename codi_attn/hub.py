"""Whether the Hugging Face hub can be downloaded from, asked once per process in at most a few seconds: an offline
run's start then names every input that needs the hub at once, instead of each download failing in turn after
the hub libraries' retries (~25 s per file)."""
from __future__ import annotations

from functools import lru_cache

PROBE_TIMEOUT_S = 3.0


@lru_cache(maxsize=None)
def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why nothing can be downloaded from the hub at `endpoint` (default: huggingface_hub's, HF_ENDPOINT or
    https://huggingface.co), in words, or None when it answers (any HTTP status). Offline mode (HF_HUB_OFFLINE)
    counts as unreachable: the libraries then read their local cache alone, without retries. One HEAD request
    through the hub libraries' own HTTP session (their proxies and certificates), without their retries."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = endpoint or constants.ENDPOINT
    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # no route, no DNS, refused, timed out, proxy or TLS failure: all mean no download
        first = str(e).splitlines()[0] if str(e) else "no message"
        return f"{url} does not answer: {type(e).__name__}: {first}"
    return None


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the hub libraries read their local cache, fast."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
