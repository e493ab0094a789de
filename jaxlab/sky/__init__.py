"""SMI sky subtraction for multi-object fibre spectra (LAMOST-style plates).

I/O (`read_plate` / `write_plate`, LAMOST single-fibre readers), a plate simulator with truth
layers, the pipeline baselines (`super_sky`, `pca_clean`), metrics (`evaluate_sky`), the
mutual-information estimators (`jaxlab.sky.mi`), the SMI model (`train_smi`, `smi_sky`) and its
safety net (`safe_sky`: sky-fibre cross-validation, blending towards the better of Super Sky and
PCA cleaning).
"""

from jaxlab.sky.baselines import bspline_master_sky as bspline_master_sky
from jaxlab.sky.baselines import line_scales as line_scales
from jaxlab.sky.baselines import pca_clean as pca_clean
from jaxlab.sky.baselines import super_sky as super_sky
from jaxlab.sky.methods import METHODS as METHODS
from jaxlab.sky.methods import estimate_sky as estimate_sky
from jaxlab.sky.methods import training_plates as training_plates
from jaxlab.sky.metrics import evaluate_sky as evaluate_sky
from jaxlab.sky.plate import Plate as Plate
from jaxlab.sky.plate import SkyFormatError as SkyFormatError
from jaxlab.sky.plate import plate_from_lamost_spectra as plate_from_lamost_spectra
from jaxlab.sky.plate import read_lamost_spectrum as read_lamost_spectrum
from jaxlab.sky.plate import read_plate as read_plate
from jaxlab.sky.plate import to_specutils as to_specutils
from jaxlab.sky.plate import write_lamost_spectrum as write_lamost_spectrum
from jaxlab.sky.plate import write_plate as write_plate
from jaxlab.sky.safety import safe_sky as safe_sky
from jaxlab.sky.simulate import PlateSimConfig as PlateSimConfig
from jaxlab.sky.simulate import simulate_plate as simulate_plate
from jaxlab.sky.smi import SMIConfig as SMIConfig
from jaxlab.sky.smi import SMIModel as SMIModel
from jaxlab.sky.smi import load_smi as load_smi
from jaxlab.sky.smi import save_smi as save_smi
from jaxlab.sky.smi import smi_shifts as smi_shifts
from jaxlab.sky.smi import smi_sky as smi_sky
from jaxlab.sky.smi import train_smi as train_smi
