"""Build a tiny random-weight Llama model directory that vLLM can load with no download.

The model exists so that the whole stack (Ray Serve + vLLM + gateway) runs on a laptop or CI
machine with no model hub: weights are random (seeded, so builds are reproducible), the
byte-level BPE tokenizer is trained locally on a few kilobytes of built-in text, and a plain
chat template is attached. Its outputs are meaningless; structured decoding is what keeps them
parseable. Real deployments point the model config at a Hugging Face id or a local path.

Attention head size is 64: vLLM's CPU attention backend rejects smaller heads.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TINY_MODEL_MARKER", "build_tiny_model", "is_tiny_model_dir"]

TINY_MODEL_MARKER = "modgate-tiny-model.json"

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A few kilobytes of marketplace-flavoured text in English and Mandarin, so the tokenizer learns
# merges for the words our prompts and listings actually use.
_CORPUS = """
You are a content moderation assistant for an online marketplace. Review the listing and decide
whether it may be published. Answer with a JSON object holding the decision, the policy category
and your confidence. Decisions: allow, block, needs_review. Categories: none, counterfeit,
prohibited_item, misleading_claim, off_platform_payment, adult, hate_harassment.
Counterfeit goods imitate a brand's trademark, logo or packaging without authorisation. Replica,
mirror quality, AAA grade, 1:1, inspired-by with logo, and "unbranded but identical" are signals.
Prohibited items include weapons and weapon parts, ammunition, explosives, controlled drugs and
paraphernalia, prescription medicine, tobacco and vaping products, live animals, human remains,
stolen goods, recalled products, hazardous chemicals, and items that require a licence.
Misleading claims: cures cancer, guaranteed weight loss, FDA approved when it is not, fake
discounts, invented certifications, "100% effective", miracle results, clinically proven without
evidence. Off-platform payment: asking buyers to pay by bank transfer, WhatsApp, WeChat Pay,
Telegram, email or phone outside the marketplace checkout; links to other shops; discount for
paying directly. Adult content: sexually explicit material, nudity, escort services. Hate and
harassment: slurs, attacks on protected groups, threats, doxxing a person.
Title: Brand new wireless earbuds with charging case, 24h battery, free shipping.
Description: Genuine product, sealed box, one year warranty. Colour black. Ships in two days.
Title: Vintage leather handbag, gently used, small scratch on the strap.
Title: Designer sneakers AAA replica 1:1 mirror quality, same as original, logo included.
Description: Message me on WhatsApp for a better price, pay by bank transfer and save 10%.
Title: Herbal tea that cures diabetes in 7 days, doctors hate it, 100% guaranteed.
Title: Kids bicycle 16 inch, blue, training wheels included, pick up only.
listing item seller price shipping warranty refund return order payment checkout buyer review
商品 标题 描述 卖家 买家 价格 包邮 正品 保证 假货 高仿 复刻 一比一 原单 微信 转账 支付宝 私下交易
全新未拆封 无线耳机 充电盒 续航 二十四小时 一年保修 黑色 两天内发货
名牌运动鞋 高仿 一比一 原版品质 带标志 加微信 私聊 优惠
草药茶 七天治愈糖尿病 百分之百 有效 医生推荐 保证
儿童自行车 十六寸 蓝色 带辅助轮 仅限自提
违禁品 武器 弹药 毒品 处方药 烟草 电子烟 活体动物 成人内容 仇恨 骚扰 威胁
审核 政策 类别 决定 允许 拦截 人工复核 置信度
{"decision": "allow", "category": "none", "confidence": 0.93}
{"decision": "block", "category": "counterfeit", "confidence": 0.88}
{"decision": "needs_review", "category": "misleading_claim", "confidence": 0.51}
0 1 2 3 4 5 6 7 8 9 0.0 0.1 0.25 0.5 0.75 0.99 1.0
"""


def is_tiny_model_dir(path: Path) -> bool:
    """True when *path* holds a model this builder wrote (and nothing else claimed the dir)."""
    return (path / TINY_MODEL_MARKER).is_file() and (path / "config.json").is_file()


def build_tiny_model(
    out_dir: Path,
    *,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 8192,
    seed: int = 0,
) -> Path:
    """Write a random tiny Llama (weights, tokenizer, chat template) into *out_dir*.

    Imports torch/transformers/tokenizers lazily: only model-building code needs them.
    Refuses to overwrite a non-empty directory that it did not create.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if hidden_size // num_heads < 64:
        raise ValueError(
            f"head size {hidden_size // num_heads} < 64: vLLM's CPU attention needs 64 or more"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not is_tiny_model_dir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a tiny model this tool built")
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.model_max_length = max_position_embeddings
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Generation config that stops on end-of-turn as well as end-of-sequence.
    gen = {"bos_token_id": fast.bos_token_id, "eos_token_id": [fast.eos_token_id, fast.convert_tokens_to_ids("<|end|>")]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out_dir / TINY_MODEL_MARKER).write_text(
        json.dumps({"builder": "modgate", "seed": seed, "vocab_size": len(fast),
                    "hidden_size": hidden_size, "num_layers": num_layers}, indent=2)
    )
    return out_dir
