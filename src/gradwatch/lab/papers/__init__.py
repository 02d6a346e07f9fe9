"""Lab presets that reproduce published results, one module per paper.

Each module builds its :class:`~gradwatch.lab.presets.Preset` (grid, claims, the
paper's citation and its published numbers as :class:`~gradwatch.lab.presets.Published`
rows) and registers it with :func:`~gradwatch.lab.presets.register_preset` when imported.
Importing this package registers them all, so ``gradwatch lab --list`` shows them:

* ``glorot2010``: Glorot & Bengio 2010, standard vs normalised init (:mod:`.glorot2010`);
* ``he2015``: He et al. 2015, Xavier vs He init in deep ReLU nets (:mod:`.he2015`);
* ``ioffe2015``: Ioffe & Szegedy 2015, batch normalisation (:mod:`.ioffe2015`);
* ``resnet2016``: He et al. 2016, plain vs residual stacks (:mod:`.resnet2016`);
* ``dying_relu``: Lu et al. 2019, networks born dead (:mod:`.dying_relu`).

Each module adds its own import line below when it lands.
"""

from __future__ import annotations

import gradwatch.lab.papers.dying_relu  # noqa: F401
import gradwatch.lab.papers.glorot2010  # noqa: F401
import gradwatch.lab.papers.he2015  # noqa: F401
import gradwatch.lab.papers.ioffe2015  # noqa: F401
import gradwatch.lab.papers.resnet2016  # noqa: F401
