"""Multi-turn text environments: one interface (:class:`TextEnv`), ScienceWorld, TextWorld, a tiny
pure-Python exploration game for tests, and worker processes with crash restart."""

from jaxlab.envs.base import ENVS as ENVS
from jaxlab.envs.base import SPLITS as SPLITS
from jaxlab.envs.base import EnvError as EnvError
from jaxlab.envs.base import Reset as Reset
from jaxlab.envs.base import Step as Step
from jaxlab.envs.base import TextEnv as TextEnv
from jaxlab.envs.base import make_env as make_env
from jaxlab.envs.tiny import TinyRoomsEnv as TinyRoomsEnv
from jaxlab.envs.worker import EnvCrashed as EnvCrashed
from jaxlab.envs.worker import EnvWorker as EnvWorker
