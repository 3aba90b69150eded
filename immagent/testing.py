"""The offline models under their public name for tests: ``immagent.testing``.

The models themselves live in ``immagent.offline`` (the model layer loads that module on
the production path, so it is not named "testing"); this module re-exports every public
name of it, so ``from immagent.testing import ScriptedModel`` keeps working and both paths
name the same objects.
"""

from immagent.offline import *  # noqa: F403  (every public name: the same objects)
from immagent.offline import __all__ as __all__
