from .engine import LLM, RequestOutput, StepOutput
from .sampling import SamplingParams
