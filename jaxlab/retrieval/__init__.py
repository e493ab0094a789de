"""PosIR: position-aware retrieval evaluation (data layout, builder, metrics, evaluation, saliency)."""

from jaxlab.retrieval.builder import DEFAULT_LENGTHS as DEFAULT_LENGTHS
from jaxlab.retrieval.builder import build_posir as build_posir
from jaxlab.retrieval.builder import builtin_dataset as builtin_dataset
from jaxlab.retrieval.builder import builtin_filler as builtin_filler
from jaxlab.retrieval.builder import builtin_items as builtin_items
from jaxlab.retrieval.builder import read_filler as read_filler
from jaxlab.retrieval.builder import read_items as read_items
from jaxlab.retrieval.builder import split_sentences as split_sentences
from jaxlab.retrieval.data import PosIRData as PosIRData
from jaxlab.retrieval.data import PosIRError as PosIRError
from jaxlab.retrieval.data import find_datasets as find_datasets
from jaxlab.retrieval.data import load_posir as load_posir
from jaxlab.retrieval.data import save_posir as save_posir
from jaxlab.retrieval.evaluate import STRATEGIES as STRATEGIES
from jaxlab.retrieval.evaluate import embed_documents as embed_documents
from jaxlab.retrieval.evaluate import evaluate_posir as evaluate_posir
from jaxlab.retrieval.evaluate import plot_report as plot_report
from jaxlab.retrieval.evaluate import retrieve as retrieve
from jaxlab.retrieval.evaluate import saliency_profile as saliency_profile
from jaxlab.retrieval.metrics import ndcg_at_k as ndcg_at_k
from jaxlab.retrieval.metrics import position_analysis as position_analysis
from jaxlab.retrieval.metrics import recall_at_k as recall_at_k
