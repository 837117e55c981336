"""Read evaluation sets in the standard benchmark layouts into one list of `EvalItem`s, prompts included.

Layouts (the `layout` of a set):
- `llava`: LLaVA's eval question files, jsonl of `{question_id, image, text[, category]}`, and an answers jsonl of
  `{question_id, answer}` (or `answers`: a list). The text is asked verbatim: LLaVA's files carry their instruction.
- `vqa`: short-answer VQA. jsonl of `{question_id, image, question|text, answers|answer[, category]}` (answers may be
  in a separate file, as strings or VQAv2's `{"answer": ...}` objects), or VQAv2's own questions/annotations JSON
  files with `image_template` naming the image. Asked with "Answer the question using a single word or phrase."
- `pope`: yes/no in POPE's layout, jsonl of `{question_id, image, text, label[, category]}` (labels may be in a
  separate file, by question_id). Or POPE's split files, as LLaVA evaluates them: `questions` a folder of
  `coco_pope_<split>.json` (labels inline, the split as category), or LLaVA's `llava_pope_test.jsonl` (with
  `category`) and `answers` that folder (labels paired by position within a split, as `eval_pope.py` pairs them).
  Same instruction as `vqa`.
- `mme`: MME's yes/no pairs, two questions per image, jsonl of `{question_id, image, text|question, label|answer,
  category: subtask}` or `questions` MME's release folder (`MME_Benchmark_release_version`). Same instruction.
- `choice`: multiple choice, jsonl of `{question_id, image, question, options: [...] | A/B/C/D keys, answer: letter
  [, hint, category]}` or MMBench's TSV (base64 images inline). Options are listed as LLaVA-1.5 does (hint, question,
  "A. ...") and asked with "Answer with the option's letter from the given choices directly.". With `circular`,
  each question is asked once per rotation of its options, as MMBench's circular evaluation does.
- `chair`: hallucination in free answers (CHAIR, Rohrbach et al. 2018), jsonl of `{question_id, image, text,
  objects: [phrases of what the image shows][, category]}`, no answers file: the objects are the reference. The text
  is asked verbatim, as `llava`'s. An answer's mentions are the phrases of the set's vocabulary it names, and a
  mention of a phrase that is not among its image's objects is a hallucination (`scoring.score_chair`).
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from llava_core import storage
from llava_core.config import EvalSetSettings

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
DEFAULT_SUFFIX = {"llava": "", "vqa": SHORT_ANSWER, "pope": SHORT_ANSWER, "mme": SHORT_ANSWER, "choice": OPTION_LETTER,
                  "chair": ""}
LETTERS = string.ascii_uppercase
# MME's subtasks, as its eval_tool calculation.py groups them (`eval_type_dict`).
MME_SUBTASKS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
MME_SUBTASK_NAMES = sum(MME_SUBTASKS.values(), ())
POPE_SPLIT_FILE = re.compile(r"_pope_(.+)\.json$")  # coco_pope_adversarial.json -> adversarial


class EvalSetError(ValueError):
    """An evaluation file that does not fit its layout; the message names the file and the row."""


@dataclass
class EvalItem:
    key: str  # unique in its set: the question id, plus "@k" for the k-th rotation of a circular question, "#n" for
    # the n-th question of one id (MME's two questions of an image share their id)
    question_id: str
    text: str  # exactly what the model is asked, instruction included
    references: list[str]  # reference answers; pope: ["yes"|"no"]; choice: [the correct letter]; chair: the objects
    image_path: str = ""  # where to read the image, or "" when it is inline
    image_b64: str = ""  # an inline image (MMBench TSV)
    category: str = "all"
    options: dict = field(default_factory=dict)  # choice: letter -> option text, in the order asked
    rotation: int = 0


# --- files ------------------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EvalSetError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def read_rows(path: str) -> list[dict]:
    """jsonl, a JSON array, VQAv2's `{"questions": [...]}` / `{"annotations": [...]}` or a TSV (MMBench)."""
    if path.endswith(".tsv"):
        return read_tsv(path)
    if path.endswith(".json"):
        try:
            data = json.loads(storage.read_text(path))
        except json.JSONDecodeError:
            return read_jsonl(path)  # POPE's coco_pope_*.json are JSON lines
        if isinstance(data, dict):
            for key in ("questions", "annotations"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise EvalSetError(f"{path}: a JSON object without a 'questions' or 'annotations' list")
        return data
    return read_jsonl(path)


def read_tsv(path: str) -> list[dict]:
    """MMBench's TSV. Its base64 images outgrow csv's default field limit (128 KiB), so the limit is lifted for the
    read, and put back after: it is process-wide."""
    previous = csv.field_size_limit(2**31 - 1)
    try:
        return list(csv.DictReader(io.StringIO(storage.read_text(path)), delimiter="\t"))
    finally:
        csv.field_size_limit(previous)


def read_pope_splits(folder: str) -> list[dict]:
    """POPE's split files in a folder (`coco_pope_adversarial.json`, `_popular`, `_random`: JSON lines of
    `{question_id, image, text, label}`), each row in its file's split as category, as haotian-liu/LLaVA
    `llava/eval/eval_pope.py` reads its `--annotation-dir`. Every file numbers from 1, so ids get the split in front."""
    rows, splits = [], set()
    for path in storage.list_files(folder, ".json"):
        match = POPE_SPLIT_FILE.search(posixpath.basename(path))
        if match is None:
            continue
        split = match.group(1)
        if split in splits:
            raise EvalSetError(f"{folder}: more than one file of POPE split {split!r}")
        splits.add(split)
        rows += [{**row, "question_id": f"{split}/{row.get('question_id', n)}", "category": split}
                 for n, row in enumerate(read_rows(path))]
    if not rows:
        raise EvalSetError(f"{folder}: no POPE split files (<dataset>_pope_<split>.json) in the folder")
    return rows


def read_mme_release(folder: str) -> list[dict]:
    """MME's release folder (`MME_Benchmark_release_version`) as LLaVA's `convert_answer_to_mme.py` (in its
    playground/data/eval/MME, run by scripts/v1_5/eval/mme.sh) reads it: in each subtask's folder, one
    `<image name>.txt` per image (beside it, or in `questions_answers_YN/` with the image in `images/`), one
    "question<TAB>Yes|No" line per question. Ids are `<subtask>/<image file>`, as LLaVA's are. Files outside a
    subtask's folder (a readme, the eval tool) are not read."""
    images, texts = {}, []
    for path in storage.list_files(folder):
        place = mme_place(path)
        if place is not None:
            if path.endswith(".txt"):
                texts.append((path, place))
            else:
                images[place] = path
    rows = []
    for path, place in texts:
        if place not in images:
            raise EvalSetError(f"{path}: no image of the same name in MME's {posixpath.basename(place[0])}/")
        rows += mme_questions(path, posixpath.basename(place[0]), images[place])
    if not rows:
        raise EvalSetError(f"{folder}: no MME question files (<subtask>/<image>.txt) in the folder")
    return rows


def mme_place(path: str) -> tuple[str, str] | None:
    """(its subtask's folder, its name without extension) for a file of an MME subtask, else None."""
    folder, name = posixpath.split(path)
    if posixpath.basename(folder) in ("images", "questions_answers_YN"):
        folder = posixpath.dirname(folder)
    if posixpath.basename(folder) not in MME_SUBTASK_NAMES:
        return None
    return folder, posixpath.splitext(name)[0]


def mme_questions(path: str, subtask: str, image: str) -> list[dict]:
    rows = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if line.strip():
            fields = line.strip().split("\t")
            if len(fields) != 2:
                raise EvalSetError(f"{path}:{number}: not 'question<TAB>answer'")
            rows.append({"question_id": f"{subtask}/{posixpath.basename(image)}", "image": image, "text": fields[0],
                         "label": fields[1], "category": subtask})
    return rows


def by_question_id(rows: list[dict], path: str) -> dict[str, dict]:
    table = {}
    for row in rows:
        if "question_id" not in row:
            raise EvalSetError(f"{path}: a row without question_id: {json.dumps(row)[:200]}")
        table[str(row["question_id"])] = row
    return table


def field_of(row: dict, names: tuple[str, ...], path: str):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    raise EvalSetError(f"{path}: question {row.get('question_id')!r} has none of the fields {list(names)}")


def reference_answers(row: dict, names: tuple[str, ...], path: str) -> list[str]:
    """Reference answers from the first of `names` present: a string or a list (of strings or VQAv2 objects)."""
    value = field_of(row, names, path)
    values = value if isinstance(value, list) else [value]
    return [str(v["answer"] if isinstance(v, dict) else v) for v in values]


def with_suffix(text: str, suffix: str) -> str:
    text = text.strip()
    return text if not suffix or text.endswith(suffix) else f"{text}\n{suffix}"


# --- layouts ----------------------------------------------------------------------------------------------------


def load_eval_set(s: EvalSetSettings) -> list[EvalItem]:
    """The set's questions in file order, each with its prompt, references and image."""
    rows = question_rows(s)
    if s.limit:
        rows = rows[:s.limit]
    suffix = DEFAULT_SUFFIX[s.layout] if s.prompt_suffix is None else s.prompt_suffix
    reader = {"llava": short_answer_item, "vqa": short_answer_item, "pope": yes_no_item, "mme": mme_item,
              "choice": choice_items, "chair": chair_item}
    items = []
    for row, answer_row in zip(rows, answer_rows(rows, s)):
        made = reader[s.layout](row, answer_row, s, suffix)
        items += made if isinstance(made, list) else [made]
    if not items:
        raise EvalSetError(f"{s.questions}: no questions")
    if s.layout == "mme":
        mme_pairs(items)  # a broken pair fails here, before a question is asked
    return number_repeated_keys(items)


def question_rows(s: EvalSetSettings) -> list[dict]:
    """The rows of the questions file, or of a folder (POPE's split files, MME's release), each with a string id."""
    if storage.is_dir(s.questions):
        folder_readers = {"pope": read_pope_splits, "mme": read_mme_release}
        if s.layout not in folder_readers:
            raise EvalSetError(f"{s.questions}: a folder, but the {s.layout} layout reads a file")
        rows = folder_readers[s.layout](s.questions)
    else:
        rows = read_rows(s.questions)
    return [{**row, "question_id": str(row.get("question_id", row.get("index", index)))}
            for index, row in enumerate(rows)]


def answer_rows(rows: list[dict], s: EvalSetSettings) -> list[dict]:
    """Each question row's answer row: itself without an answers file; else the answers file's row of its id (which
    wins over anything the question row carries: LLaVA's files carry a "text"); else, for a folder of POPE split
    files, its label by position."""
    if not s.answers:
        return rows
    if s.layout == "pope" and storage.is_dir(s.answers):
        return pope_labels_in_order(rows, s)
    table = by_question_id(read_rows(s.answers), s.answers)
    for row in rows:
        if row["question_id"] not in table:
            raise EvalSetError(f"{s.answers}: no answer for question {row['question_id']!r} of {s.questions}")
    return [table[row["question_id"]] for row in rows]


def pope_labels_in_order(rows: list[dict], s: EvalSetSettings) -> list[dict]:
    """LLaVA's `eval_pope.py` pairs the i-th question of category c (in question-file order) with the i-th line of
    `coco_pope_<c>.json`; so does this, and checks that the two name the same image."""
    labels, taken, paired = defaultdict(list), Counter(), []
    for label in read_pope_splits(s.answers):
        labels[label["category"]].append(label)
    for row in rows:
        split = str(row.get("category") or "")
        if taken[split] == len(labels[split]):
            raise EvalSetError(f"{s.answers}: no label for question {row['question_id']!r} of {s.questions}, number "
                               f"{taken[split] + 1} of category {split!r} (the splits: {sorted(labels)})")
        label = labels[split][taken[split]]
        taken[split] += 1
        if row.get("image") and label.get("image") and (
                posixpath.basename(str(row["image"])) != posixpath.basename(str(label["image"]))):
            raise EvalSetError(f"{s.answers}: question {row['question_id']!r} of {s.questions} shows {row['image']!r} "
                               f"but its label, line {taken[split]} of split {split!r}, is for {label['image']!r}")
        paired.append(label)
    unasked = {split: len(lines) - taken[split] for split, lines in labels.items() if len(lines) > taken[split]}
    if unasked and not s.limit:
        raise EvalSetError(f"{s.answers}: labels without a question in {s.questions}, per split: {unasked}")
    return paired


def number_repeated_keys(items: list[EvalItem]) -> list[EvalItem]:
    """The n-th item of a key that repeats gets "#n" (MME's two questions of an image share their id)."""
    seen = Counter()
    for item in items:
        seen[item.key] += 1
        if seen[item.key] > 1:
            item.key = f"{item.key}#{seen[item.key]}"
    return items


def image_of(row: dict, s: EvalSetSettings) -> str:
    name = s.image_template.format(**row) if s.image_template else field_of(row, ("image",), s.questions)
    return name if storage.is_remote(name) or name.startswith("/") else storage.join(s.image_folder, name)


def short_answer_item(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> EvalItem:
    question = field_of(row, ("text", "question"), s.questions)
    source = s.answers or s.questions
    if s.layout == "llava" and not s.answers:
        raise EvalSetError(f"{s.questions}: the llava layout needs an answers file (its question rows carry a "
                           "'text' that is the question, not the answer)")
    keys = ("answer", "answers", "text") if s.layout == "llava" else ("answers", "answer", "multiple_choice_answer")
    references = reference_answers(answer_row, keys, source)
    return EvalItem(row["question_id"], row["question_id"], with_suffix(question, suffix), references,
                    image_path=image_of(row, s), category=str(row.get("category") or "all"))


def yes_no_item(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> EvalItem:
    question = field_of(row, ("text", "question"), s.questions)
    label = str(field_of(answer_row, ("label", "answer"), s.answers or s.questions)).strip().lower()
    if label not in ("yes", "no"):
        raise EvalSetError(f"{s.answers or s.questions}: question {row['question_id']!r} has label {label!r}, "
                           "not 'yes' or 'no'")
    return EvalItem(row["question_id"], row["question_id"], with_suffix(question, suffix), [label],
                    image_path=image_of(row, s), category=str(row.get("category") or "all"))


def mme_item(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> EvalItem:
    item = yes_no_item(row, answer_row, s, suffix)
    if item.category not in MME_SUBTASK_NAMES:
        raise EvalSetError(f"{s.questions}: question {row['question_id']!r} has category {item.category!r}, not one of "
                           f"MME's subtasks {list(MME_SUBTASK_NAMES)}")
    return item


def mme_pairs(items: list[EvalItem]) -> list[tuple[int, int]]:
    """The indices of each image's two questions, grouped by (subtask, image): MME asks two of every image, and its
    calculation.py asserts two."""
    groups = defaultdict(list)
    for index, item in enumerate(items):
        groups[(item.category, item.image_path or item.question_id)].append(index)
    broken = [f"{subtask}: {image} ({len(g)})" for (subtask, image), g in groups.items() if len(g) != 2]
    if broken:
        raise EvalSetError(f"MME asks two questions of every image; these images have another number (a `limit` "
                           f"may have cut a pair): {broken[:5]}")
    return [tuple(g) for g in groups.values()]


def options_of(row: dict) -> list[str]:
    if isinstance(row.get("options"), list):
        return [str(o) for o in row["options"]]
    # MMBench columns A, B, C, D; a missing option is empty (or "nan" when the TSV was written by pandas).
    return [str(row[c]) for c in LETTERS if c in row and str(row[c]).strip() not in ("", "nan", "None")]


def choice_items(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> list[EvalItem]:
    options = options_of(row)
    if len(options) < 2:
        raise EvalSetError(f"{s.questions}: question {row['question_id']!r} has fewer than two options")
    answer = str(field_of(answer_row, ("answer", "label"), s.answers or s.questions)).strip()
    if answer not in LETTERS[:len(options)]:
        raise EvalSetError(f"{s.answers or s.questions}: question {row['question_id']!r} has answer {answer!r}, "
                           f"not one of its option letters {list(LETTERS[:len(options)])}")
    correct = LETTERS.index(answer)
    question = field_of(row, ("question", "text"), s.questions)
    hint = str(row.get("hint") or "").strip()
    if hint and hint != "nan":
        question = f"{hint}\n{question}"
    image = {"image_b64": row["image"]} if s.questions.endswith(".tsv") else {"image_path": image_of(row, s)}
    items = []
    for k in range(len(options) if s.circular else 1):
        rotated = options[k:] + options[:k]  # LLaVA's MMBench loop: options = options[1:] + options[:1]
        letters = LETTERS[:len(rotated)]
        text = question + "".join(f"\n{letter}. {option}" for letter, option in zip(letters, rotated))
        key = f"{row['question_id']}@{k}" if s.circular else row["question_id"]
        items.append(EvalItem(key, row["question_id"], with_suffix(text, suffix),
                              [letters[(correct - k) % len(options)]],
                              category=str(row.get("category") or "all"), options=dict(zip(letters, rotated)),
                              rotation=k, **image))
    return items


def chair_item(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> EvalItem:
    """A free-answer question whose references are the phrases of the objects its image shows, each a non-empty
    string: a missing or empty list would make every mention a hallucination, so it is refused here."""
    question = field_of(row, ("text", "question"), s.questions)
    objects = row.get("objects")
    if not isinstance(objects, list) or not objects or not all(isinstance(o, str) and o.strip() for o in objects):
        raise EvalSetError(f"{s.questions}: question {row['question_id']!r} needs `objects`, a non-empty list of "
                           f"non-empty strings (the objects its image shows), not {json.dumps(objects)[:200]}")
    return EvalItem(row["question_id"], row["question_id"], with_suffix(question, suffix), objects,
                    image_path=image_of(row, s), category=str(row.get("category") or "all"))
