"""Whether the Hugging Face hub can be downloaded from, asked once per process in a few seconds (a connect
timeout; a resolver that hangs can take longer): an offline run's start then names every input that needs the hub
at once, instead of each download failing in turn after the hub libraries' retries (~25 s per file)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


def error_line(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"


@lru_cache(maxsize=None)
def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why nothing can be downloaded from the hub at `endpoint` (default: huggingface_hub's, HF_ENDPOINT or
    https://huggingface.co), in words, or None when it answers (any HTTP status). Offline mode counts as
    unreachable: the libraries then read their local cache alone, without retries. One HEAD request through the
    hub libraries' own HTTP session (their proxies and certificates), without their retries."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "offline mode is set (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    url = endpoint or constants.ENDPOINT
    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # no route, no DNS, refused, timed out, proxy or TLS failure: all mean no download
        return f"{url} does not answer: {error_line(e)}"
    return None


def datasets_offline() -> bool:
    """The datasets library's offline mode (HF_HUB_OFFLINE, or its own HF_DATASETS_OFFLINE): it reads its cache."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def dataset_cached(name: str) -> bool:
    """Some copy of hub dataset `name` in the local caches (datasets' own, or the hub's), which datasets falls back
    on when the hub does not answer."""
    import datasets.config
    from huggingface_hub import constants

    return any(Path(datasets.config.HF_DATASETS_CACHE).glob(f"*{name}*")) or any(
        Path(constants.HF_HUB_CACHE).glob(f"datasets--*{name}*"))
