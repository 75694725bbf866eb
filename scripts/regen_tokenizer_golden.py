#!/usr/bin/env python
"""Regenerate the tokenizer fixture: prompts and transformers' golden ids.

    scripts/fetch_clip_vocab.sh .cache/clip-tokenizers
    python scripts/regen_tokenizer_golden.py [--tokenizers DIR]

Writes ``tests/fixtures/tokenizer/prompts.json`` (hand-picked tricky prompts
plus deterministic generated ones) and ``golden.json``: for the ``sd1`` and
``sd2`` folders under DIR, the ids of
``CLIPTokenizer.from_pretrained(folder)(prompt, padding="max_length",
max_length=77, truncation=True)``, i.e. exactly what diffusers feeds the text
encoder. Trailing padding is not stored (only ``ids[:sum(attention_mask)]``);
the test re-adds it.

Needs transformers (it is only a test/dev dependency); never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "tokenizer"
MAX_LENGTH = 77
SEED = 20240601

HAND_PICKED = [
    "",
    " ",
    "   \t\n  ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on mars, highly detailed, 8k",
    "a beautiful painting of a castle on a hill, (masterpiece:1.2), best quality, highly detailed, sharp focus",
    "(masterpiece:1.2), (best quality), ((ultra-detailed)), [[blurry]], {lowres}",
    "portrait of a woman, (red hair:1.4), (freckles:0.8), <lora:detail:0.7>",
    "(((((very emphasized)))))",
    "a cat:1.5 and a dog:0.5, AND a bird",
    "ugly, deformed, bad anatomy, extra fingers, mutated hands, poorly drawn face, watermark, text",
    "!!!", "!", "hello!", "hello !", "hello! world!!", "?!?!", "...", "…", "---", "___", "***", ",,,,", ";:;:",
    "!important", "wow!!!1!", "<>", "<<>>", "||", "a|b", "{}[]()",
    "it's", "IT'S", "it 's", "don't", "won't", "can't", "I'm", "you're", "we've", "she'll", "he'd",
    "y'all", "rock'n'roll", "'s", "'tis", "''s", "it’s curly", "o'clock", "the cat's whiskers", "'quoted'",
    "\"double quoted\"", "«guillemets»", "„German“",
    "0", "1234567890", "3.14159", "1,000,000", "8k uhd", "4K", "1920x1080", "2.5D", "v1.5", "f/1.8", "50mm",
    "1st 2nd 3rd 4th", "#hashtag #sd", "@user", "user@example.com", "https://example.com/a?b=c&d=e",
    "&amp; &lt;b&gt; &#39;", "C:\\path\\to\\file.png", "~/.cache", "$100 €50 £20 ¥1000", "50% off", "a+b=c", "x^2",
    "café", "CAFÉ", "cafe\u0301", "naïve résumé", "Ångström", "Zürich straße", "STRASSE ß", "İstanbul", "ıi",
    "ǅ ǈ ǋ", "ΣΊΣΥΦΟΣ", "Σ", "ΌΣΟΣ", "ὈΔΥΣΣΕΎΣ", "Москва", "ПРИВЕТ мир", "Ελληνικά", "Ǆemal",
    "东京塔的夜景", "東京タワー 夜景", "日本語のテキスト", "한국어 텍스트", "ㅎㅏㄴ", "\u1112\u1161\u11ab",
    "中文，标点。", "「引用」", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "مرحبا بالعالم", "العربية 123 عربي", "שלום עולם", "עברית ABC", "\u202eevil\u202c", "\u200fRTL mark",
    "हिन्दी", "क्षत्रिय", "தமிழ்", "ไทย ภาษา", "ພາສາລາວ", "ქართული", "Հայերեն", "ትግርኛ",
    "e\u0301\u0301\u0301", "a\u0300\u0301\u0302\u0303\u0304", "\u0301start with mark", "Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
    "😀", "😀😃😄", "a 😀 b", "👍🏽", "👨‍👩‍👧‍👦", "🇺🇸🇯🇵", "❤️", "☺", "★☆", "♥♦♣♠", "→←↑↓", "✓✗",
    "🐱 cat 🐶 dog", "fire🔥emoji", "😀" * 40,
    "a\x00b", "\x00", "\x00\x00\x00", "nul\x00in the middle", "bell\x07", "esc\x1b[31mred",
    "\x01\x02\x03", "\x1c\x1d\x1e\x1f", "a\x7fb", "a\x85b", "a\x0bb\x0cc", "tab\tseparated\tvalues",
    "line1\nline2\r\nline3", "\u2028line sep\u2029para", "nbsp\u00a0here", "ideographic\u3000space",
    "zero\u200bwidth", "zwj\u200dzwnj\u200c", "\ufeffbom", "soft\u00adhyphen", "ﬁ ﬂ ﬀ", "Ⅻ ⅻ", "½ ¼ ¾", "x² y³",
    "①②③", "٣ ٤ ٥", "१२३", "𝕬𝖇𝖈", "𝐀𝐁𝐂", "Ⓐⓑ", "\U0001d400\U0001d7ce",
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|>", "<|StartOfText|>", "x<|endoftext|>!", "!<|endoftext|>", "<|endoftext", "|endoftext|>",
    "<|endoftext|><|endoftext|>", "< |endoftext| >", "</w>", "a</w>b",
    "\u1c89 \ua7cb \ua7ce \U00010d50 \U00016ea0", "\u0558 \u058b \U00010940 \U00011de0",
    "word " * 100,
    "a, " * 60,
    "x" * 300,
    "supercalifragilisticexpialidocious" * 10,
    "!" * 100,
    "1" * 100,
    "é" * 200,
    "long prompt " + ", ".join(f"detail {i}" for i in range(80)),
    "the quick brown fox jumps over the lazy dog " * 8,
    ("a very long prompt about a dragon, " * 3000)[:10000],
]

SUBJECTS = ["a cat", "an astronaut", "a knight", "a cyberpunk city", "a bowl of ramen", "a lighthouse",
            "an old man", "a red fox", "a spaceship", "a forest spirit", "a steampunk robot", "a medieval village",
            "a portrait of a queen", "a dragon", "a mountain lake", "a vintage car", "a jellyfish", "a samurai"]
SCENES = ["at sunset", "in the rain", "on mars", "underwater", "in a misty forest", "at night, neon lights",
          "in the style of van gogh", "by greg rutkowski and alphonse mucha", "studio lighting", "golden hour",
          "trending on artstation", "unreal engine 5", "octane render", "35mm film", "watercolor", "ukiyo-e"]
QUALITY = ["masterpiece", "best quality", "highly detailed", "sharp focus", "8k", "4k uhd", "photorealistic",
           "intricate", "cinematic", "hdr", "dslr", "award-winning", "illustration", "concept art"]
NEGATIVE = ["lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit",
            "cropped", "worst quality", "low quality", "jpeg artifacts", "signature", "watermark", "blurry"]
SPICE = ["!", "!!", "?", "...", ":", ";", "'s", "'re", "'t", "’", "é", "ß", "Σ", "İ", "😀", "🔥", "東京", "ع",
         "ש", "\u0301", "\x00", "\t", "\n", "\u00a0", "\u200b", "<|endoftext|>", "<|ENDOFTEXT|>", "1.5", "(", ")",
         "[", "]", "{", "}", "<", ">", "|", "\\", "/", "#", "@", "&", "%", "*", "~", "`", "^", "_", "-", "+", "="]
FUZZ_ALPHABET = list("abcdefXYZ0189 '\"!?.,:;()[]{}<>|/\\-_*&^%$#@~`+=\t\n\r\x00\x01\x1c\x7f\x85\xa0") + [
    "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "'s", "'T", "'re", "'LL", "'d", "'M", "'ve", "Σ", "İ",
    "ß", "ǅ", "\u0301", "\u0308", "e\u0301", "\u200b", "\u200f", "\u202e", "\u3000", "\ufeff", "😀", "👍🏽",
    "👨‍👩‍👧", "\U0001f1fa\U0001f1f8", "東", "ア", "한", "\u1100\u1161", "ع", "ש", "\u0915\u094d\u0937", "Ⅻ", "½", "²",
    "\ufb01", "\uff21", "\U00010d50", "\ua7ce", "\U00016ea0", "\u0558", "\u1c89"]


def _weight(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.25:
        return f"({text}:{rng.choice(['0.5', '0.8', '1.1', '1.2', '1.3', '1.5', '2'])})"
    if r < 0.35:
        return "(" * rng.randint(1, 3) + text + ")" * rng.randint(1, 3)
    if r < 0.42:
        return f"[{text}]"
    return text


def _random_codepoint(rng: random.Random) -> str:
    while True:
        cp = rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x10000), rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def generated_prompts() -> list[str]:
    rng = random.Random(SEED)
    out = []
    for _ in range(120):  # SD-style prompts with weights
        parts = [rng.choice(SUBJECTS), rng.choice(SCENES)] + rng.sample(QUALITY, rng.randint(0, 5))
        parts = [_weight(rng, p) for p in parts]
        text = ", ".join(parts)
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        out.append(text)
    for _ in range(30):  # negative prompts
        out.append(", ".join(_weight(rng, p) for p in rng.sample(NEGATIVE, rng.randint(3, 10))))
    for _ in range(60):  # prompts with awkward characters spliced in
        words = (rng.choice(SUBJECTS) + " " + rng.choice(SCENES)).split()
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(words) + 1)
            glue = rng.choice(["", " "])
            words.insert(pos, glue + rng.choice(SPICE) + glue)
        out.append(rng.choice([" ", "", "  "]).join(words))
    for _ in range(25):  # long prompts, mostly past 77 tokens
        n = rng.randint(20, 70)
        out.append(", ".join(_weight(rng, rng.choice(SUBJECTS + SCENES + QUALITY + NEGATIVE)) for _ in range(n)))
    for _ in range(60):  # fuzz from a tricky alphabet
        out.append("".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 30))))
    for _ in range(40):  # random code points (any plane, unassigned included)
        out.append("".join(_random_codepoint(rng) for _ in range(rng.randint(1, 12))))
    return out


def all_prompts() -> list[str]:
    seen, out = set(), []
    for p in HAND_PICKED + generated_prompts():
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def golden(folder: Path, prompts: list[str]) -> dict:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    enc = tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    ids = [row[: sum(mask)] for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return {"pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "ids": ids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizers", default=os.environ.get("CPUFLOW_CLIP_TOKENIZERS", REPO / ".cache/clip-tokenizers"),
                    help="folder with sd1/ and sd2/ (made by scripts/fetch_clip_vocab.sh)")
    args = ap.parse_args()
    import tokenizers
    import transformers

    root = Path(args.tokenizers)
    prompts = all_prompts()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    data = {
        "about": "transformers CLIPTokenizer(prompt, padding='max_length', max_length=77, truncation=True) "
                 "input_ids up to the padding; made by scripts/regen_tokenizer_golden.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "max_length": MAX_LENGTH,
        "n_prompts": len(prompts),
    }
    for name in ("sd1", "sd2"):
        data[name] = golden(root / name, prompts)
    text = json.dumps(data, separators=(",", ":"))
    # one prompt per line keeps diffs readable
    for name in ("sd1", "sd2"):
        rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in data[name]["ids"])
        text = text.replace(json.dumps(data[name]["ids"], separators=(",", ":")), "[\n" + rows + "\n]", 1)
    (FIXTURES / "golden.json").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(prompts)} prompts and golden ids for sd1, sd2 to {FIXTURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
