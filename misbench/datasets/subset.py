"""The images a limit takes (`--limit`, `--train-limit`, `--val-limit`, a config's `limit`) and how many classes
they cover: said in a warning when fewer than the data holds, and recorded in the output."""

__all__ = ["Subset", "first_images"]

import dataclasses
import logging

import numpy as np

from ..runtime.fileio import option_label

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Subset:
    """The first `images` of the `of` images of DATA in dataset order, taken by `option` N (`limit`)."""

    option: str  # the settings field: limit, train_limit, val_limit
    limit: int | None
    images: int
    of: int
    classes_covered: int  # labelled classes among the images taken (0: unlabelled data)
    classes: int          # labelled classes in the whole data

    def record(self) -> dict | None:
        """What an output records of the subset; None without a limit (an output without one is unchanged)."""
        return None if self.limit is None else dataclasses.asdict(self)


def first_images(source, limit: int | None, option: str = "limit") -> Subset:
    """The images a `limit` takes: the first ones in dataset order (rows stay in dataset order). A folder is
    sorted by class, so a limit can cover few classes: that is said in a warning with the count covered of the
    total, and the returned Subset says it to the output's metadata."""
    n = len(source) if limit is None else min(int(limit), len(source))
    covered = total = 0
    if limit is not None:
        labels = np.asarray(source.labels())
        total = len(np.unique(labels[labels >= 0]))
        taken = labels[:n]
        covered = len(np.unique(taken[taken >= 0]))
        if covered < total:
            log.warning("%s %d takes the first %d of %d images in dataset order (sorted by class): they cover %d of "
                        "the %d classes; class-wise accuracy and class units see only those", option_label(option), limit, n,
                        len(source), covered, total)
    return Subset(option, None if limit is None else int(limit), n, len(source), covered, total)
