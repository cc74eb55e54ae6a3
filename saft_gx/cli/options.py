"""Option groups shared by several commands."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..core import defaults
from ..embedding.embed import DEFAULT_MAX_TOKENS, DEFAULT_OVERLONG, OVERLONG_CHOICES, TOKEN_POSITIONS
from ..pipeline import ColumnOptions, EmbedOptions
from ..core.threshold import ThresholdRule, rule_from_options


def stack_options(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


column_options = stack_options(
    click.option("--prompt-column", help="Column holding the user's request (auto: prompt/instruction/question)."),
    click.option("--response-column", help="Column holding the answer (auto: response/output/answer/completion)."),
    click.option("--text-column", help="Score one plain-text column instead (auto: text)."),
    click.option("--messages-column", help="Column holding a list of {role, content} messages (auto: messages)."),
)

embed_options = stack_options(
    click.option("--model", help="Local HF folder, .gguf file, or cached hub id. Default: the embedded SmolLM2-135M-Instruct."),
    click.option("--layer", type=int, help="Decoder layer whose output is read (1-based). Default: layers "
                 f"{' + '.join(f'{f:.1f}' for f in defaults.STACK_FRACTIONS)} × depth side by side (one layer, "
                 f"{defaults.PLAIN_LAYER_FRACTION:.2f} × depth, with --no-anchors)."),
    click.option("--token", type=click.Choice(TOKEN_POSITIONS), help="Which token's hidden state: last, prompt-end or "
                 f"mean. Default: {defaults.TOKEN} ({defaults.PLAIN_TOKEN} with --no-anchors)."),
    click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True,
                 help="Token cap per row (per prompt with --token prompt-end)."),
    click.option("--overlong", type=click.Choice(list(OVERLONG_CHOICES)), default=DEFAULT_OVERLONG, show_default=True,
                 help="Rows over --max-tokens: truncate (a one-line notice says how many) or error."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ..."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                 help="auto: bfloat16 on CUDA, float32 on CPU."),
    click.option("--batch-tokens", type=int, help="Padded tokens per forward pass (default 16384)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), envvar="SAFT_GX_CACHE",
                 help="Embedding cache folder (default ~/.cache/saft_gx, or $SAFT_GX_CACHE)."),
)

threshold_options = stack_options(
    click.option("--threshold", type=float, help="Flag rows with harm_score > this value."),
    click.option("--remove-fraction", type=float, help="Flag the top fraction of rows, e.g. 0.2."),
    click.option("--contamination", type=float, help="Expected fraction of harmful rows; flags that top fraction."),
)


def embed_opts(kw: dict[str, Any]) -> EmbedOptions:
    return EmbedOptions(
        model=kw.pop("model"), layer=kw.pop("layer"), token=kw.pop("token"), max_tokens=kw.pop("max_tokens"),
        overlong=kw.pop("overlong"), device=kw.pop("device"), dtype=kw.pop("dtype"),
        batch_tokens=kw.pop("batch_tokens"), cache_dir=kw.pop("cache_dir"),
    )


def column_opts(kw: dict[str, Any]) -> ColumnOptions:
    return ColumnOptions(prompt=kw.pop("prompt_column"), response=kw.pop("response_column"),
                         text=kw.pop("text_column"), messages=kw.pop("messages_column"))


def threshold_rule(kw: dict[str, Any]) -> ThresholdRule | None:
    return rule_from_options(kw.pop("threshold"), kw.pop("remove_fraction"), kw.pop("contamination"))


class Progress:
    """A tqdm bar on stderr (hidden when stderr is not a terminal or with --quiet)."""

    def __init__(self, total: int | None, desc: str, quiet: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="row", disable=True if quiet else None, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
