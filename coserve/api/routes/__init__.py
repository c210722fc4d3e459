"""One APIRouter per feature; each module exposes `router` and may expose `setup(state)`."""
