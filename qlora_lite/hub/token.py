"""The Hub token: where it is found (argument, HF_TOKEN, `hf auth login`, the Colab secret), and kept out of logs."""

from __future__ import annotations

from qlora_lite.compat import install_log_redaction

TOKEN_HELP = (
    "set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens), run `hf auth login`, "
    "or in Colab add the secret HF_TOKEN (key icon) and pass token=userdata.get('HF_TOKEN')"
)

_SECRETS: set[str] = set()
_REDACTED = "hf_***"


def redact(text: str) -> str:
    """`text` with every token this process has used replaced by 'hf_***'."""
    for secret in _SECRETS:
        text = text.replace(secret, _REDACTED)
    return text


def protect_token(token: str | None) -> None:
    """Redact `token` from every log record from now on, whatever logger or handler prints it."""
    if not token or len(token) < 8:
        return
    _SECRETS.add(token)
    install_log_redaction(redact)


class Token(str):
    """A token that is itself as a string but hides behind 'hf_***' when shown (a notebook cell's value,
    a repr in a traceback or a log line): `print(repr(token))` or a cell ending in it never shows it."""

    def __repr__(self) -> str:
        return f"'{_REDACTED}'"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's display of a cell's value
        printer.text(repr(self))


def in_colab() -> bool:
    """True inside a Colab notebook kernel (not in a `!python` subprocess, which cannot read secrets)."""
    try:
        from huggingface_hub.utils import is_google_colab
    except ImportError:
        return False
    return is_google_colab()


def resolve_token(explicit: str | None = None) -> str | None:
    """The Hub token: `explicit`, else $HF_TOKEN, else the file `hf auth login` wrote, else (in a Colab
    notebook process only) the Colab secret HF_TOKEN. None when there is none.

    huggingface_hub's `get_token` reads those three places in that order. A `!python ...` subprocess of a
    notebook cannot read Colab secrets: read it in the notebook (`userdata.get("HF_TOKEN")`) and pass it
    as `token=`, or export it as HF_TOKEN first.
    """
    token = explicit.strip() if explicit else None
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token and in_colab():  # get_token skips Colab Enterprise and caches a refused prompt
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            token = userdata.get("HF_TOKEN")
        except Exception:  # noqa: BLE001 - no secret, or access refused: simply no token
            token = None
    protect_token(token)
    return Token(token) if token else None
