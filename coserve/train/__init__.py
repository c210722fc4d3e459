"""The Python trainer API: Hugging Face's Trainer shape over co-served finetuning.

    from coserve import Trainer, TrainingArguments
    trainer = Trainer(model=llm_or_deployment_or_path, args=TrainingArguments(output_dir="out", max_steps=50),
                      peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), train_dataset="data.jsonl")
    trainer.train(); trainer.evaluate(); trainer.save_model("out/final")

arguments.py maps TrainingArguments onto a FinetuneConfig, callbacks.py holds
the state, control flags and callback protocol, engine_client.py talks to an
LLM or a Deployment, trainer.py drives the job step by step.
"""
from coserve.train.arguments import TrainingArguments
from coserve.train.callbacks import (
    DefaultFlowCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainOutput,
)
from coserve.train.trainer import Trainer

__all__ = ["Trainer", "TrainingArguments", "TrainerCallback", "TrainerControl", "TrainerState", "TrainOutput",
           "DefaultFlowCallback"]
