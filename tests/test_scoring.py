"""One scorer: the reward model is read on exactly the tokens trl's RewardTrainer trained it on."""

import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from pipeline import models
from pipeline.rl.rollout import generate, sampling_config
from pipeline.scoring import RewardScorer, reward_input_ids
from tests import families

PROMPT = [{"role": "user", "content": "how was the music of star quest ?"}]
RESPONSE = "the music was really wonderful ."
OTHER = ([{"role": "user", "content": "how was the plot ?"}], "the plot was great and the acting was fine .")


def trainer_ids(tokenizer, model, row, tmp_path) -> list[int]:
    """What RewardTrainer itself tokenizes a preference row into (its `chosen_ids`)."""
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", max_length=None, bf16=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tokenizer)
    return list(trainer.train_dataset[0]["chosen_ids"])


class ScriptedPolicy(torch.nn.Module):
    """A policy whose sampler answers every prompt with the given tokens (then padding), so that
    everything `pipeline.rl.rollout.generate` does around the model runs as in PPO and eval: prompt ids,
    truncation after the stop token, decoding."""

    def __init__(self, answer: list[int]):
        super().__init__()
        self.answer, self.generation_config = answer, None

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.answer] * len(input_ids))], 1)


@pytest.mark.parametrize(
    "family, prompt, response",
    [
        ("chatml", PROMPT, RESPONSE),  # training text ends in "\n" after <|im_end|>
        ("bos", PROMPT, RESPONSE),  # the template writes BOS
        ("bos", "how was the music of star quest ? ", RESPONSE),  # plain text: the tokenizer adds BOS and trl EOS
    ],
)
def test_every_stage_scores_what_reward_trainer_trained_on(family, prompt, response, tmp_path):
    tokenizer = families.chatml_tokenizer() if family == "chatml" else families.bos_tokenizer()
    model = families.reward_model(tokenizer)
    expected_ids = trainer_ids(
        tokenizer,
        model,
        {
            "prompt": prompt,
            "chosen": response if isinstance(prompt, str) else [{"role": "assistant", "content": response}],
            "rejected": "x" if isinstance(prompt, str) else [{"role": "assistant", "content": "x"}],
        },
        tmp_path,
    )
    assert reward_input_ids(tokenizer, prompt, response) == expected_ids
    if family == "chatml":
        assert tokenizer.decode(expected_ids[-2:]) == "<|im_end|>\n"  # the head trained after the newline
    else:
        assert expected_ids[0] == tokenizer.bos_token_id and expected_ids.count(tokenizer.bos_token_id) == 1
    with torch.no_grad():
        trained = model(input_ids=torch.tensor([expected_ids])).logits[0, 0].item()

    scorer = RewardScorer(model, tokenizer, batch_size=8)
    # RM stage report / reference statistics: dataset (prompt, response) pairs, padded in a batch
    rm_stage = scorer([prompt, OTHER[0]], [response, OTHER[1]])[0].item()
    # PPO and eval: a rollout from pipeline.rl.rollout.generate, the stop token and padding after the answer
    stop, pad = models.stop_token_ids(tokenizer), tokenizer.pad_token_id
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [stop[0], pad, pad]
    tokenizer.padding_side = "left"
    rollout = generate(ScriptedPolicy(answer), tokenizer, [prompt], sampling_config(1.0, 8, stop, pad), "cpu")
    assert rollout.has_stop.all() and rollout.response_mask.sum().item() == len(answer) - 2
    ppo_and_eval = scorer([OTHER[0], prompt], [OTHER[1], rollout.texts[0]])[1].item()
    assert rm_stage == pytest.approx(trained, abs=1e-5)
    assert ppo_and_eval == pytest.approx(trained, abs=1e-5)
