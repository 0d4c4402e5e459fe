"""
The Hugging Face hub, when it cannot be reached: a hub model (--model gpt2) or dataset (--dataset hh) that cannot be
fetched ends the run within seconds, in one line that names it and says what to do, instead of the hub libraries'
retries (about 25 s per file when the connection is refused) and a long chained traceback.

models.py and data.py load every hub repository inside `with fetching(...)`. Local folders and files never get
here. A reader learning the methods can skip this file.
"""
from contextlib import contextmanager

from engineering.cli import InputError


@contextmanager
def fetching(repo_id, repo_type, what, instead):
    """Load the hub repository `repo_id` ("model" or "dataset") inside this block.

    Online, the hub is first asked about the repository once, without retries: when that request is refused or
    unanswered (timeout 10 s), or the hub answers with an error (no such repository, a gated or private one),
    InputError says so before the loading starts. Offline (HF_HUB_OFFLINE=1) only the cache is read, and an
    OSError from the block (transformers' "couldn't find them in the cached files", datasets' ConnectionError)
    means the repository is not cached: InputError too. `what` names the thing for the message ("model 'gpt2'"),
    `instead` says what the user can pass instead ("a local folder as --model").
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HfHubHTTPError
    offline = constants.HF_HUB_OFFLINE
    if not offline:
        try:
            HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
        except HfHubHTTPError as e:  # the hub answered: wrong name, gated, private, or a server error
            raise InputError(f"cannot fetch {what} from the Hugging Face hub ({str(e).splitlines()[0]}); check "
                             f"the name, or pass {instead}") from None
        except Exception as e:  # noqa: BLE001 - refused, unresolvable, timed out: no route to the hub
            raise InputError(f"cannot reach the Hugging Face hub to fetch {what} ({type(e).__name__}: {e}); pass "
                             f"{instead}, or set HF_HUB_OFFLINE=1 if it is in your Hugging Face cache") from None
    try:
        yield
    except OSError:
        if not offline:
            raise
        raise InputError(f"{what} is not in your Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; "
                         f"pass {instead}, or run once with network access and without HF_HUB_OFFLINE") from None
