// The whole Python binding of the BPE core (fastlm._native); the contract is the docstring of fastlm/tokenizer.py.
// Every long call releases the GIL, after the Python inputs it reads are pinned (references held until the GIL is
// back).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "bpe/level.h"
#include "bpe/model.h"
#include "bpe/pretokenize.h"
#include "bpe/trainer.h"

namespace py = pybind11;
using namespace pybind11::literals;
using fastlm::bpe::Level;
using fastlm::bpe::Model;
using fastlm::bpe::TokenId;
using fastlm::bpe::Trainer;

namespace {

// The UTF-8 of a str, owned by the str object (valid while it lives). A lone surrogate raises
// UnicodeEncodeError (a ValueError) here, before any native code sees it.
std::string_view utf8_of(py::handle text, const char* argument) {
  if (!PyUnicode_Check(text.ptr())) {
    throw py::type_error(std::string(argument) + " must be str, got " + std::string(py::str(py::type::handle_of(text))));
  }
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  return {data, static_cast<size_t>(size)};
}

// Views of the UTF-8 of each str of an iterable, with references that keep them alive.
struct PinnedTexts {
  std::vector<py::object> owners;
  std::vector<std::string_view> views;

  PinnedTexts(const py::iterable& texts, const char* argument) {
    for (py::handle text : texts) {
      views.push_back(utf8_of(text, argument));
      owners.push_back(py::reinterpret_borrow<py::object>(text));
    }
  }
};

// The progress callback of a long call made without the GIL: it takes the GIL so that Python runs a pending signal
// handler (Ctrl-C stops training at the next merge or block, not when the call returns) and then `progress` (a
// callable of the count done so far, or None). Made and destroyed with the GIL held (it holds a reference).
fastlm::bpe::Progress python_progress(const py::object& progress) {
  return [progress](uint64_t done) {
    py::gil_scoped_acquire acquire;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!progress.is_none()) progress(done);
  };
}

// A Model plus one Python int per id, made once: building a list of ids then takes references instead of
// allocating an int per id (most ids are above CPython's small-int cache).
struct BoundModel {
  Model model;
  py::tuple id_objects;

  explicit BoundModel(Model&& native) : model(std::move(native)), id_objects(model.vocab_size()) {
    for (size_t id = 0; id < model.vocab_size(); ++id) id_objects[id] = py::int_(id);
  }

  py::list to_list(const TokenId* ids, size_t count) const {
    py::list out(count);
    PyObject** objects = &PyTuple_GET_ITEM(id_objects.ptr(), 0);
    for (size_t i = 0; i < count; ++i) {
      PyObject* id = objects[ids[i]];
      Py_INCREF(id);
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), id);
    }
    return out;
  }
};

// Pauses CPython's garbage collector for its lifetime. Building one list per text allocates containers in a row,
// and every 700 of them would start a collection pass over the young lists (all ours, none garbage): on 10 MB of
// short lines those passes took longer than the encoding itself (116 of 218 ms on 2 cores).
class CollectorPause {
 public:
  CollectorPause() : was_enabled_(PyGC_Disable()) {}
  ~CollectorPause() {
    if (was_enabled_) PyGC_Enable();
  }
  CollectorPause(const CollectorPause&) = delete;
  CollectorPause& operator=(const CollectorPause&) = delete;

 private:
  int was_enabled_;
};

// An id (signed or unsigned) checked against the vocabulary: a bad one raises ValueError naming it and its position.
template <typename Int>
TokenId checked_id(Int id, size_t position, size_t vocab_size) {
  bool in_range = static_cast<unsigned long long>(id) < vocab_size;
  if constexpr (std::is_signed_v<Int>) in_range = in_range && id >= 0;
  if (!in_range) {
    throw py::value_error("id " + std::to_string(id) + " (at position " + std::to_string(position) +
                          ") is out of range for vocab size " + std::to_string(vocab_size));
  }
  return static_cast<TokenId>(id);
}

// Appends the ids of a 1-D numpy array read as Int (unsigned arrays as unsigned, so that values above 2^63 show as
// they are).
template <typename Int>
void append_array_ids(py::handle ids, size_t vocab_size, std::vector<TokenId>& out) {
  const auto array = py::array_t<Int, py::array::c_style | py::array::forcecast>::ensure(ids);
  if (!array || array.ndim() != 1) throw py::value_error("ids must be a 1-D integer array");
  const size_t count = static_cast<size_t>(array.size());
  const Int* values = array.data();
  for (size_t i = 0; i < count; ++i) out.push_back(checked_id(values[i], i, vocab_size));
}

// Appends the token ids of a list/sequence of ints or an integer numpy array; negative or too large ids raise
// ValueError, items that are not integers TypeError (positions counted within `ids`).
void append_ids(py::handle ids, size_t vocab_size, std::vector<TokenId>& out) {
  if (py::isinstance<py::array>(ids)) {
    const char kind = py::reinterpret_borrow<py::array>(ids).dtype().kind();
    if (kind == 'i') return append_array_ids<long long>(ids, vocab_size, out);
    if (kind == 'u') return append_array_ids<unsigned long long>(ids, vocab_size, out);
    throw py::type_error("ids must be an integer array, got dtype " +
                         std::string(py::str(py::reinterpret_borrow<py::array>(ids).dtype())));
  }
  const py::object sequence = py::reinterpret_steal<py::object>(PySequence_Fast(ids.ptr(), "ids must be a sequence of int"));
  if (!sequence) throw py::error_already_set();
  const size_t count = static_cast<size_t>(PySequence_Fast_GET_SIZE(sequence.ptr()));
  PyObject** items = PySequence_Fast_ITEMS(sequence.ptr());
  for (size_t i = 0; i < count; ++i) {
    int overflow = 0;
    const long long id = PyLong_AsLongLongAndOverflow(items[i], &overflow);
    if (id == -1 && PyErr_Occurred()) {
      if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
      PyErr_Clear();
      throw py::type_error("ids must be integers, got " + std::string(Py_TYPE(items[i])->tp_name) + " at position " +
                           std::to_string(i));
    }
    if (overflow != 0) throw py::value_error("id at position " + std::to_string(i) + " does not fit in 64 bits");
    out.push_back(checked_id(id, i, vocab_size));
  }
}

std::string decode_to_bytes(const Model& model, py::handle ids) {
  std::vector<TokenId> checked;
  append_ids(ids, model.vocab_size(), checked);
  py::gil_scoped_release release;
  return model.decode(checked.data(), checked.size());
}

// A str of UTF-8 bytes, each invalid sequence U+FFFD (as bytes.decode(errors="replace")): only hand-made ids give
// invalid UTF-8.
PyObject* new_str(const std::string& utf8) {
  PyObject* text = PyUnicode_DecodeUTF8(utf8.data(), static_cast<Py_ssize_t>(utf8.size()), "replace");
  if (text == nullptr) throw py::error_already_set();
  return text;
}

// A numpy array that owns (moves in) a vector, with no copy.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({owned->size()}, {sizeof(T)}, owned->data(), free_when_done);
}

py::list encode_to_list(const BoundModel& bound, std::string_view text) {
  std::vector<TokenId> ids;
  {
    py::gil_scoped_release release;
    bound.model.encode(text, ids);
  }
  return bound.to_list(ids.data(), ids.size());
}

// Encodes a batch on native threads: text i is ids[offsets[i]:offsets[i + 1]].
void encode_batch(const BoundModel& bound, const py::iterable& texts, int num_threads, std::vector<TokenId>& ids,
                  std::vector<int64_t>& offsets) {
  const PinnedTexts pinned(texts, "texts items");
  py::gil_scoped_release release;
  bound.model.encode_batch(pinned.views, num_threads, ids, offsets);
}

std::vector<std::string> to_token_bytes(const py::list& tokens) {
  std::vector<std::string> out;
  out.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (!PyBytes_Check(tokens[i].ptr())) {
      throw py::type_error("tokens[" + std::to_string(i) + "] must be bytes, got " +
                           std::string(py::str(py::type::handle_of(tokens[i]))));
    }
    out.emplace_back(tokens[i].cast<std::string>());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastlm's native BPE core: pre-splitting, training, encoding and decoding (see fastlm/tokenizer.py).";
  py::register_exception<fastlm::bpe::FileError>(m, "FileError", PyExc_OSError);

  m.def(
      "pretokenize",
      [](py::str text, const std::string& level) {
        const std::string_view utf8 = utf8_of(text, "text");
        std::string scratch;
        std::vector<std::string_view> pieces;
        fastlm::bpe::pretokenize(fastlm::bpe::parse_level(level), utf8, scratch, pieces);
        py::list out(pieces.size());
        for (size_t i = 0; i < pieces.size(); ++i) {
          PyObject* piece = PyUnicode_DecodeUTF8(pieces[i].data(), static_cast<Py_ssize_t>(pieces[i].size()), "strict");
          if (piece == nullptr) throw py::error_already_set();
          PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), piece);
        }
        return out;
      },
      "text"_a, "level"_a, "The pre-tokens of text at a level (\"byte\": the cl100k split; \"char\": ▁-marked words).");

  py::class_<Trainer>(m, "Trainer", "Counts pre-tokens of streamed texts or files, then learns BPE merges.")
      .def(py::init([](const std::string& level, int num_threads) {
             return std::make_unique<Trainer>(fastlm::bpe::parse_level(level), num_threads);
           }),
           "level"_a, "num_threads"_a = 0)
      .def(
          "add_texts",
          [](Trainer& self, const py::iterable& texts) {
            const PinnedTexts pinned(texts, "texts items");
            py::gil_scoped_release release;
            self.add_texts(pinned.views);
          },
          "texts"_a)
      .def(
          "add_files",
          [](Trainer& self, const std::vector<std::string>& paths, const py::object& progress) {
            const fastlm::bpe::Progress report = python_progress(progress);
            py::gil_scoped_release release;
            self.add_files(paths, report);
          },
          "paths"_a, "progress"_a = py::none(), "progress(bytes read so far) is called after each block read.")
      .def(
          "train",
          [](Trainer& self, size_t vocab_size, const std::vector<std::string>& special_tokens, uint64_t min_frequency,
             double character_coverage, const py::object& progress) {
            const fastlm::bpe::Progress report = python_progress(progress);
            fastlm::bpe::TrainResult result;
            {
              py::gil_scoped_release release;
              result = self.train(vocab_size, special_tokens, min_frequency, character_coverage, report);
            }
            py::list tokens(result.tokens.size());
            for (size_t i = 0; i < result.tokens.size(); ++i) {
              PyList_SET_ITEM(tokens.ptr(), static_cast<Py_ssize_t>(i), py::bytes(result.tokens[i]).release().ptr());
            }
            return py::make_tuple(tokens, py::cast(result.merges));
          },
          "vocab_size"_a, "special_tokens"_a, "min_frequency"_a = 2, "character_coverage"_a = 0.9995,
          "progress"_a = py::none(), "progress(merges made so far) is called after each merge.");

  py::class_<BoundModel>(m, "Model", "A trained BPE model: encodes text to ids and decodes ids to text or bytes.")
      .def(py::init([](const std::string& level, const py::list& tokens, const std::vector<fastlm::bpe::Merge>& merges,
                       uint32_t num_special, size_t cache_size) {
             return std::make_unique<BoundModel>(Model(fastlm::bpe::parse_level(level), to_token_bytes(tokens), merges,
                                                       num_special, cache_size));
           }),
           "level"_a, "tokens"_a, "merges"_a, "num_special"_a, "cache_size"_a = size_t{1} << 16)
      .def(
          "encode", [](const BoundModel& bound, py::str text) { return encode_to_list(bound, utf8_of(text, "text")); },
          "text"_a)
      .def(
          "encode_bytes",
          [](const BoundModel& bound, const py::bytes& data) {
            if (bound.model.level() != Level::kByte) throw py::value_error("encode_bytes needs a byte-level model");
            return encode_to_list(bound, std::string_view(data));
          },
          "data"_a)
      .def(
          "encode_batch",
          [](const BoundModel& bound, const py::iterable& texts, int num_threads) {
            std::vector<TokenId> ids;
            std::vector<int64_t> offsets;
            encode_batch(bound, texts, num_threads, ids, offsets);
            CollectorPause pause;
            py::list out(offsets.size() - 1);
            for (size_t i = 0; i + 1 < offsets.size(); ++i) {
              PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i),
                              bound.to_list(ids.data() + offsets[i], offsets[i + 1] - offsets[i]).release().ptr());
            }
            return out;
          },
          "texts"_a, "num_threads"_a = 0)
      .def(
          "encode_batch_flat",
          [](const BoundModel& bound, const py::iterable& texts, int num_threads) {
            std::vector<TokenId> ids;
            std::vector<int64_t> offsets;
            encode_batch(bound, texts, num_threads, ids, offsets);
            return py::make_tuple(to_numpy(std::move(ids)), to_numpy(std::move(offsets)));
          },
          "texts"_a, "num_threads"_a = 0)
      .def(
          "decode_bytes",
          [](const BoundModel& bound, py::handle ids) { return py::bytes(decode_to_bytes(bound.model, ids)); },
          "ids"_a)
      .def(
          "decode",
          [](const BoundModel& bound, py::handle ids) {
            return py::reinterpret_steal<py::str>(new_str(decode_to_bytes(bound.model, ids)));
          },
          "ids"_a)
      .def(
          "decode_batch",
          [](const BoundModel& bound, const py::iterable& batch, int num_threads) {
            const Model& self = bound.model;
            // All texts' ids back to back, read under the GIL; then decoded on native threads without it.
            std::vector<TokenId> ids;
            std::vector<int64_t> offsets{0};
            for (py::handle text_ids : batch) {
              append_ids(text_ids, self.vocab_size(), ids);
              offsets.push_back(static_cast<int64_t>(ids.size()));
            }
            std::vector<std::string> texts;
            {
              py::gil_scoped_release release;
              texts = self.decode_batch(ids.data(), offsets, num_threads);
            }
            py::list result(texts.size());
            for (size_t i = 0; i < texts.size(); ++i) {
              PyList_SET_ITEM(result.ptr(), static_cast<Py_ssize_t>(i), new_str(texts[i]));
            }
            return result;
          },
          "batch"_a, "num_threads"_a = 0)
      .def_property_readonly("vocab_size", [](const BoundModel& bound) { return bound.model.vocab_size(); })
      .def_property_readonly("level",
                             [](const BoundModel& bound) { return bound.model.level() == Level::kByte ? "byte" : "char"; });
}
