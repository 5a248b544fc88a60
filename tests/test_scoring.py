"""One scorer: the reward model is read on exactly the tokens trl's RewardTrainer trained it on."""

import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from pipeline.rollout import prompt_ids
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


def policy_rollout_texts(tokenizer, prompt, response, stop_token):
    """What PPO and eval hand the scorer: the response the policy generated (its stop token
    included), decoded with special tokens skipped."""
    ids = prompt_ids(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(stop_token)]
    return tokenizer.decode(response_ids, skip_special_tokens=True), len(ids)


@pytest.mark.parametrize("family, prompt, response", [
    ("chatml", PROMPT, RESPONSE),                                    # training text ends in "\n" after <|im_end|>
    ("bos", PROMPT, RESPONSE),                                       # the template writes BOS
    ("bos", "how was the music of star quest ? ", RESPONSE),        # plain text: the tokenizer adds BOS and trl EOS
])
def test_every_stage_scores_what_reward_trainer_trained_on(family, prompt, response, tmp_path):
    tokenizer = families.chatml_tokenizer() if family == "chatml" else families.bos_tokenizer()
    model = families.reward_model(tokenizer)
    expected_ids = trainer_ids(tokenizer, model, {"prompt": prompt, "chosen": response if isinstance(prompt, str) else
                                                  [{"role": "assistant", "content": response}],
                                                  "rejected": "x" if isinstance(prompt, str) else
                                                  [{"role": "assistant", "content": "x"}]}, tmp_path)
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
    # PPO and eval: the policy's generated tokens (stop token included), decoded
    stop = tokenizer.eos_token
    decoded, _ = policy_rollout_texts(tokenizer, prompt, response, stop)
    ppo_and_eval = scorer([OTHER[0], prompt], [OTHER[1], decoded])[1].item()
    assert rm_stage == pytest.approx(trained, abs=1e-5)
    assert ppo_and_eval == pytest.approx(trained, abs=1e-5)
