"""Progress for Python callers: in a notebook (a Jupyter kernel) the API draws tqdm.auto bars by default;
elsewhere it stays silent (the library logs; the CLI draws its own bars). Callbacks, as the API calls them:

- extract, evaluate: progress(done, total)
- score, study:      progress(stage, done, total)   (stage "embed", "score", a study step's name)
- prune, retrain:    progress(step, epoch, done, total)
"""

__all__ = ["AUTO", "resolve_progress", "in_notebook", "NotebookProgress"]

import sys

AUTO = "auto"  # the API's default: bars in a notebook, nothing elsewhere


def in_notebook() -> bool:
    """A Jupyter kernel (ZMQ shell): where tqdm.auto draws widgets and a user sees no log."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


class NotebookProgress:
    """One tqdm.auto bar per stage; the stage is every argument before (done, total)."""

    def __init__(self):
        self.bars = {}

    def __call__(self, *args):
        *stage, done, total = args
        key = " ".join(str(s) for s in stage)
        if key not in self.bars:
            # tqdm.auto picks the notebook widget (or the text bar where ipywidgets is missing)
            from tqdm.auto import tqdm

            self.bars[key] = tqdm(total=total, initial=done, desc=key or None, leave=False)
        bar = self.bars[key]
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    def close(self):
        for bar in self.bars.values():
            bar.close()


def resolve_progress(progress):
    """The callback to use: `progress` itself, or for AUTO a NotebookProgress in a notebook and None elsewhere."""
    if isinstance(progress, str) and progress == AUTO:
        return NotebookProgress() if in_notebook() else None
    return progress
