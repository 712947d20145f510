#include "state_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>

#include "config.h"
#include "dtype.h"
#include "error.h"
#include "regular_file.h"
#include "sha256.h"
#include "strict_json.h"

namespace mambart {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr const char* kFormat = "mambart-state";
// Names the file uses for its own tensors and metadata: no state tensor may take them.
constexpr const char* kReserved[] = {"tokens", "logits", "fed", "rng"};

struct Fd {
    int fd = -1;
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
};

// Up to n bytes at `off` (fewer only at the end of the file); -1 on a read error (errno set).
int64_t pread_full(int fd, void* dst, size_t n, uint64_t off) {
    size_t got = 0;
    while (got < n) {
        const ssize_t k = ::pread(fd, static_cast<char*>(dst) + got, n - got, off_t(off + got));
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return -1;
        if (k == 0) break;
        got += size_t(k);
    }
    return int64_t(got);
}

// Where a state file's bytes come from: an open file, read as needed, or memory.
struct Source {
    uint64_t size = 0;
    std::function<int64_t(uint64_t off, void* dst, size_t n)> read;  // as pread_full
};

[[noreturn]] void bad(const std::string& path, const std::string& msg) {
    throw StateError(str_cat(path, ": not a valid mambart state file: ", msg));
}

// A JSON value for a message, Python-style ('text', None), printable and at most about 80 chars.
std::string repr(const json* v) {
    if (!v || v->is_null()) return "None";
    std::string s = v->is_string() ? "'" + v->get<std::string>() + "'" : v->dump();
    if (s.size() > 80) s = s.substr(0, 80) + "...";
    return printable_ascii(s);
}

std::string list_text(const std::vector<int64_t>& v, const char* open = "[",
                      const char* close = "]") {
    std::string out = open;
    for (size_t i = 0; i < v.size(); ++i) out += str_cat(i ? ", " : "", v[i]);
    return out + close;
}

bool non_negative_int(const json& v) {
    return v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
}

// A decimal integer written as text (digits, an optional '-', at most 40 characters) in
// [0, hi]; throws std::invalid_argument saying why not.
uint64_t decimal(const json* v, const char* name, uint64_t hi) {
    if (!v) throw std::invalid_argument(str_cat(name, " missing"));
    const std::string s = v->is_string() ? v->get<std::string>() : std::string();
    const size_t neg = !s.empty() && s[0] == '-' ? 1 : 0;
    bool ok = v->is_string() && s.size() > neg && s.size() <= 40;
    for (size_t i = neg; ok && i < s.size(); ++i) ok = s[i] >= '0' && s[i] <= '9';
    if (!ok) throw std::invalid_argument(str_cat(name, " ", repr(v), " is not a decimal integer"));
    uint64_t x = 0;
    bool over = false;
    for (size_t i = neg; i < s.size(); ++i) {
        const uint64_t d = uint64_t(s[i] - '0');
        over = over || x > (std::numeric_limits<uint64_t>::max() - d) / 10;
        if (!over) x = x * 10 + d;
    }
    if (over || x > hi || (neg && x != 0))
        throw std::invalid_argument(str_cat(name, " ", printable_ascii(s), " is outside [0, ", hi,
                                            "]"));
    return x;
}

// A model family name: 1 to 64 characters (UTF-8, validated by the JSON parser), none of them
// a control character.
bool family_name(const std::string& s) {
    size_t chars = 0;
    for (size_t i = 0; i < s.size(); ++chars) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c == 0x7f) return false;
        if (c == 0xc2 && i + 1 < s.size() &&
            static_cast<unsigned char>(s[i + 1]) < 0xa0)  // U+0080..U+009F
            return false;
        i += c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    }
    return chars > 0 && chars <= 64;
}

// The state tensors a version-2 file declares (metadata state_spec) and its layer types.
void read_spec(const json& meta, const std::string& path, StateFile* f) {
    json spec, types;
    try {
        const auto ss = meta.find("state_spec"), lt = meta.find("layer_types");
        if (ss == meta.end() || !ss->is_string() || lt == meta.end() || !lt->is_string())
            throw StrictJsonError("missing", false);
        const std::string& a = ss->get_ref<const std::string&>();
        const std::string& b = lt->get_ref<const std::string&>();
        spec = parse_json_strict(a.data(), a.data() + a.size());
        types = parse_json_strict(b.data(), b.data() + b.size());
    } catch (const StrictJsonError&) {
        bad(path, "metadata state_spec / layer_types are not valid JSON");
    }
    bool ok = types.is_array();
    for (size_t i = 0; ok && i < types.size(); ++i)
        ok = types[i].is_string() && !types[i].get_ref<const std::string&>().empty();
    if (!ok) bad(path, "metadata layer_types must be a list of layer type names");
    f->model.has_layer_types = true;
    for (const json& t : types) f->model.layer_types.push_back(t.get<std::string>());
    if (!spec.is_array() || spec.empty()) bad(path, "metadata state_spec must be a non-empty list");
    for (const json& e : spec) {
        bool good = e.is_object() && e.size() == 3 && e.contains("name") && e.contains("shape") &&
                    e.contains("layers") && e["name"].is_string() && e["shape"].is_array() &&
                    e["layers"].is_array();
        const std::string name = good ? e["name"].get<std::string>() : std::string();
        good = good && !name.empty();
        for (const char* r : kReserved) good = good && name != r;
        for (const StateTensor& t : f->tensors) good = good && t.name != name;
        for (size_t i = 0; good && i < e["shape"].size(); ++i)
            good = non_negative_int(e["shape"][i]);
        StateTensor t;
        for (size_t i = 0; good && i < e["layers"].size(); ++i) {
            const json& l = e["layers"][i];
            good = non_negative_int(l) && l.get<uint64_t>() < types.size();
            if (good) t.layers.push_back(l.get<int64_t>());
        }
        if (!good) bad(path, str_cat("metadata state_spec has a malformed entry ", repr(&e)));
        t.name = name;
        f->tensors.push_back(std::move(t));
    }
}

// A tensor entry of the header, placed: its shape and byte range in the data section.
struct Placed {
    std::string name;
    std::vector<int64_t> shape;
    uint64_t off = 0, nbytes = 0;
    bool bf16 = false;  // a state tensor stored as BF16 (option state_dtype)
};

StateFile parse(const Source& src, const std::string& path, const LayerTypes& types) {
    const uint64_t size = src.size;
    unsigned char lenb[8];
    if (size < 8 || src.read(0, lenb, 8) != 8) bad(path, "shorter than the 8-byte header length");
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(lenb[i]) << (8 * i);
    if (n > size - 8 || n > uint64_t(kMaxStateHeaderBytes))
        bad(path, str_cat("header length ", n, " exceeds the file (", size, " bytes)"));
    std::string text(size_t(n), '\0');
    if (src.read(8, &text[0], size_t(n)) != int64_t(n))
        bad(path, "the file ended inside its header");
    json header;
    try {
        header = parse_json_strict(text.data(), text.data() + text.size());
    } catch (const StrictJsonError& e) {
        bad(path, str_cat("header is not valid JSON (", e.what(), ")"));
    }
    if (!header.is_object() || !header.contains("__metadata__") ||
        !header["__metadata__"].is_object())
        bad(path, "no __metadata__");
    const json meta = header["__metadata__"];
    header.erase("__metadata__");
    auto field = [&](const char* k) -> const json* {
        const auto it = meta.find(k);
        return it == meta.end() ? nullptr : &*it;
    };
    if (!field("format") || *field("format") != kFormat)
        bad(path, str_cat("format is ", repr(field("format")), ", expected '", kFormat, "'"));
    const json* ver = field("format_version");
    if (!ver || (*ver != "1" && *ver != "2"))
        bad(path, str_cat("format_version ", repr(ver),
                          " is not supported (this mambart reads 1, 2)"));
    for (const char* k : {"model_fingerprint", "dtype", "architecture", "fed", "has_rng"})
        if (!field(k) || !field(k)->is_string()) bad(path, str_cat("metadata '", k, "' missing"));
    StateFile f;
    f.version = ver->get<std::string>();
    f.model.fingerprint = field("model_fingerprint")->get<std::string>();
    f.model.dtype = field("dtype")->get<std::string>();
    f.model.architecture = field("architecture")->get<std::string>();
    if (f.version == "1") {  // exactly conv and ssm; no layer types
        f.tensors.resize(2);
        f.tensors[0].name = "conv";
        f.tensors[1].name = "ssm";
    } else {
        read_spec(meta, path, &f);
    }

    // The tensors, in the order of their data (malformed entries first: refused below); each
    // must start where the previous one ended, with the bytes its shape says, inside the file.
    auto want = [&](const std::string& name) -> const char* {
        if (name == "tokens") return "I32";
        if (name == "logits") return "F32";
        for (const StateTensor& t : f.tensors)
            if (t.name == name) return "F32";
        return nullptr;
    };
    auto first_offset = [](const json& info) -> int64_t {
        if (!info.is_object() || !info.contains("data_offsets")) return -1;
        const json& o = info["data_offsets"];
        return o.is_array() && !o.empty() && o[0].is_number_integer() ? o[0].get<int64_t>() : -1;
    };
    std::vector<std::pair<std::string, const json*>> items;
    for (auto it = header.begin(); it != header.end(); ++it) items.emplace_back(it.key(), &*it);
    std::stable_sort(items.begin(), items.end(), [&](const auto& a, const auto& b) {
        return first_offset(*a.second) < first_offset(*b.second);
    });
    const uint64_t body = 8 + n;
    uint64_t expect = 0;
    std::vector<Placed> placed;
    for (const auto& [name, info] : items) {
        const std::string shown = printable_ascii(name);
        const char* dtype = want(name);
        if (!dtype) bad(path, str_cat("unexpected tensor '", shown, "'"));
        // A state tensor may be BF16: the state of a generator with state_dtype bfloat16.
        const bool state_tensor = name != "tokens" && name != "logits";
        const bool bf16 = state_tensor && info->is_object() && info->contains("dtype") &&
                          (*info)["dtype"] == "BF16";
        if (!bf16 && (!info->is_object() || !info->contains("dtype") || (*info)["dtype"] != dtype))
            bad(path, str_cat("tensor '", shown, "' must be ", dtype,
                              state_tensor ? " or BF16" : ""));
        const json* shape = info->contains("shape") ? &(*info)["shape"] : nullptr;
        const json* offs = info->contains("data_offsets") ? &(*info)["data_offsets"] : nullptr;
        bool ok = shape && shape->is_array() && offs && offs->is_array() && offs->size() == 2 &&
                  (*offs)[0].is_number_integer() && (*offs)[1].is_number_integer();
        for (size_t i = 0; ok && i < shape->size(); ++i) ok = non_negative_int((*shape)[i]);
        if (!ok) bad(path, str_cat("tensor '", shown, "' has a malformed shape or data_offsets"));
        Placed p;
        p.name = name;
        p.bf16 = bf16;
        bool fits = true;  // no overflow: prod(shape) * element size and the offsets as uint64
        uint64_t nbytes = bf16 ? 2 : 4;
        for (const json& d : *shape) {
            const uint64_t v = d.get<uint64_t>();
            fits = fits && v <= uint64_t(std::numeric_limits<int64_t>::max()) &&
                   (v == 0 || nbytes <= std::numeric_limits<uint64_t>::max() / v);
            nbytes = fits ? nbytes * v : 0;
            p.shape.push_back(int64_t(v));
        }
        const bool o_ok = non_negative_int((*offs)[0]) && non_negative_int((*offs)[1]);
        const uint64_t o0 = o_ok ? (*offs)[0].get<uint64_t>() : 0;
        const uint64_t o1 = o_ok ? (*offs)[1].get<uint64_t>() : 0;
        if (!fits || !o_ok || o0 != expect || o1 < o0 || o1 - o0 != nbytes || o1 > size - body)
            bad(path, str_cat("tensor '", shown, "' offsets ", printable_ascii(offs->dump()),
                              " do not match its shape ", printable_ascii(shape->dump()),
                              " and the file size"));
        p.off = o0;
        p.nbytes = nbytes;
        expect = o1;
        placed.push_back(std::move(p));
    }
    if (body + expect != size)
        bad(path, str_cat(size - body - expect, " trailing bytes after the tensors"));
    auto find = [&](const std::string& name) -> const Placed* {
        for (const Placed& p : placed)
            if (p.name == name) return &p;
        return nullptr;
    };
    for (const StateTensor& t : f.tensors)
        if (!find(t.name)) bad(path, str_cat("tensor '", printable_ascii(t.name), "' missing"));
    if (!find("tokens")) bad(path, "tensor 'tokens' missing");

    // The data: exactly the bytes the header accounts for (at most the file's size).
    auto load = [&](const Placed& p, void* dst) {
        if (src.read(body + p.off, dst, size_t(p.nbytes)) != int64_t(p.nbytes))
            bad(path, "the file ended inside its tensors");
    };
    auto finite = [&](const std::vector<float>& v, const std::string& name) {
        for (float x : v)
            if (!std::isfinite(x))
                bad(path, str_cat("tensor '", printable_ascii(name),
                                  "' holds NaN or infinite values"));
    };
    for (StateTensor& t : f.tensors) {
        const Placed& p = *find(t.name);
        t.shape = p.shape;
        t.bf16 = p.bf16;
        if (p.bf16) {  // widened to fp32 (exact)
            std::vector<uint16_t> half(size_t(p.nbytes / 2));
            load(p, half.data());
            t.data.resize(half.size());
            convert_to_f32(half.data(), DType::BF16, t.data.data(), half.size());
        } else {
            t.data.resize(size_t(p.nbytes / 4));
            load(p, t.data.data());
        }
        finite(t.data, t.name);
    }
    const Placed& tp = *find("tokens");
    f.tokens.resize(size_t(tp.nbytes / 4));
    load(tp, f.tokens.data());
    const Placed* lp = find("logits");
    if (lp) {
        f.logits.resize(size_t(lp->nbytes / 4));
        load(*lp, f.logits.data());
        finite(f.logits, "logits");
    }

    try {  // strict decimals in the runtime's ranges (issue 23)
        const uint64_t fed_max = uint64_t(std::numeric_limits<int64_t>::max());
        f.fed = int64_t(decimal(field("fed"), "fed", fed_max));
        const std::string rng = field("has_rng")->get<std::string>();
        if (rng != "0" && rng != "1")
            throw std::invalid_argument(str_cat("has_rng is ", repr(field("has_rng")),
                                                ", not '0' or '1'"));
        f.has_rng = rng == "1";
        if (f.has_rng) {
            const uint64_t hi = std::numeric_limits<uint64_t>::max();
            f.seed = decimal(field("seed"), "seed", hi);
            f.stream = decimal(field("stream"), "stream", hi);
            f.counter = decimal(field("counter"), "counter", hi);
        }
    } catch (const std::invalid_argument& e) {
        bad(path, str_cat("metadata fed/seed/stream/counter/has_rng must be decimal integers in "
                          "range (", e.what(), ")"));
    }
    const std::string& arch = f.model.architecture;
    if (f.version == "1" && arch != "mamba1" && arch != "mamba2")  // version 1 knew only these
        bad(path, str_cat("architecture ", repr(field("architecture")),
                          " is not mamba1 or mamba2"));
    if (!family_name(arch))
        bad(path, str_cat("architecture ", repr(field("architecture")),
                          " is not a model family name"));
    std::vector<std::string> unknown;
    for (const std::string& t : f.model.layer_types)
        if (!types.known(t) && std::find(unknown.begin(), unknown.end(), t) == unknown.end())
            unknown.push_back(t);
    if (!unknown.empty()) {
        std::sort(unknown.begin(), unknown.end());
        std::string list;
        for (const std::string& t : unknown) list += (list.empty() ? "'" : ", '") + t + "'";
        bad(path, str_cat("layer type(s) [", printable_ascii(list),
                          "] are not known to this mambart (", types.names(), ")"));
    }
    if (tp.shape.size() != 1 || f.fed < 0 || f.fed > int64_t(f.tokens.size()))
        bad(path, str_cat("fed = ", f.fed, " does not fit ", f.tokens.size(), " tokens"));
    if (f.fed == int64_t(f.tokens.size())) {
        if (!lp || lp->shape.size() != 1)
            bad(path, "a state with no pending tokens needs its next-token logits");
    } else {
        f.logits.clear();  // only meaningful with nothing pending
    }
    return f;
}

// JSON text as Python's json.dumps writes it by default (ASCII only, ", " and ": ").
std::string json_str(const std::string& s) { return json(s).dump(-1, ' ', true); }

// The process's umask, read once (a plain open() gives files 0666 less it; mkstemp gives 0600).
mode_t process_umask() {
    static const mode_t mask = [] {
        if (FILE* fp = std::fopen("/proc/self/status", "r")) {
            char line[256];
            unsigned m = 0;
            bool found = false;
            while (!found && std::fgets(line, sizeof line, fp))
                found = std::sscanf(line, "Umask: %o", &m) == 1;
            std::fclose(fp);
            if (found) return mode_t(m);
        }
        const mode_t m = ::umask(022);  // no /proc: read it by setting it back
        ::umask(m);
        return m;
    }();
    return mask;
}

}  // namespace

StateFile read_state_file(const std::string& path, const LayerTypes& types) {
    struct stat st {};
    Fd fd;
    try {
        fd.fd = open_regular_file(path, "state file", &st);  // a FIFO never blocks here
    } catch (const ModelLoadError& e) {
        throw StateError(e.what());
    }
    Source src;
    src.size = uint64_t(st.st_size);
    src.read = [&](uint64_t off, void* dst, size_t n) {
        const int64_t k = pread_full(fd.fd, dst, n, off);
        if (k < 0)
            throw StateError(str_cat(path, ": cannot read the state file: ", std::strerror(errno)));
        return k;
    };
    return parse(src, path, types);
}

StateFile parse_state_file(const std::string& bytes, const std::string& path,
                           const LayerTypes& types) {
    Source src;
    src.size = bytes.size();
    src.read = [&](uint64_t off, void* dst, size_t n) -> int64_t {
        if (off >= bytes.size()) return 0;
        const size_t k = std::min<uint64_t>(n, bytes.size() - off);
        std::memcpy(dst, bytes.data() + off, k);
        return int64_t(k);
    };
    return parse(src, path, types);
}

std::string state_file_bytes(const StateFile& f) {
    const bool v1 = !f.model.has_layer_types;
    MAMBART_CHECK_ARG(f.fed >= 0 && f.fed <= int64_t(f.tokens.size()), "state: fed = ", f.fed,
                      " outside [0, ", f.tokens.size(), "]");
    MAMBART_CHECK_ARG(f.fed < int64_t(f.tokens.size()) || !f.logits.empty(),
                      "state: a state with no pending tokens needs its next-token logits");
    ojson meta = ojson::object();
    meta["format"] = kFormat;
    meta["format_version"] = v1 ? "1" : "2";
    meta["model_fingerprint"] = f.model.fingerprint;
    meta["dtype"] = f.model.dtype;
    meta["architecture"] = f.model.architecture;
    meta["fed"] = std::to_string(f.fed);
    meta["has_rng"] = f.has_rng ? "1" : "0";
    if (!v1) {
        std::string spec = "[", types = "[";
        for (size_t i = 0; i < f.tensors.size(); ++i) {
            const StateTensor& t = f.tensors[i];
            spec += str_cat(i ? ", " : "", "{\"name\": ", json_str(t.name),
                            ", \"shape\": ", list_text(t.shape), ", \"layers\": ",
                            list_text(t.layers), "}");
        }
        for (size_t i = 0; i < f.model.layer_types.size(); ++i)
            types += str_cat(i ? ", " : "", json_str(f.model.layer_types[i]));
        meta["state_spec"] = spec + "]";
        meta["layer_types"] = types + "]";
    }
    if (f.has_rng) {
        meta["seed"] = std::to_string(f.seed);
        meta["stream"] = std::to_string(f.stream);
        meta["counter"] = std::to_string(f.counter);
    }
    ojson header = ojson::object();
    header["__metadata__"] = meta;
    uint64_t off = 0;
    auto entry = [&](const std::string& name, const char* dtype, std::vector<int64_t> shape,
                     size_t count) {
        MAMBART_CHECK_ARG(header.find(name) == header.end(), "state: tensor name '", name,
                          "' is used twice");
        uint64_t n = 1;
        for (int64_t d : shape) n *= uint64_t(d);
        MAMBART_CHECK_ARG(n == count, "state: tensor '", name, "' has ", count,
                          " values for shape ", list_text(shape));
        const uint64_t bytes = (std::strcmp(dtype, "BF16") == 0 ? 2 : 4) * n;
        ojson e = ojson::object();
        e["dtype"] = dtype;
        e["shape"] = shape;
        e["data_offsets"] = {off, off + bytes};
        header[name] = e;
        off += bytes;
    };
    for (const StateTensor& t : f.tensors)
        entry(t.name, t.bf16 ? "BF16" : "F32", t.shape, t.data.size());
    entry("tokens", "I32", {int64_t(f.tokens.size())}, f.tokens.size());
    if (!f.logits.empty()) entry("logits", "F32", {int64_t(f.logits.size())}, f.logits.size());
    std::string hb = header.dump(-1, ' ', true);
    hb.append((8 - hb.size() % 8) % 8, ' ');
    std::string out;
    out.reserve(8 + hb.size() + off);
    for (int i = 0; i < 8; ++i) out += char((uint64_t(hb.size()) >> (8 * i)) & 0xff);
    out += hb;
    auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
    std::vector<uint16_t> half;
    for (const StateTensor& t : f.tensors) {
        if (!t.bf16) {
            put(t.data.data(), t.data.size() * 4);
            continue;
        }
        half.resize(t.data.size());  // the values are bf16 already: exact
        convert_from_f32(t.data.data(), half.data(), DType::BF16, half.size());
        put(half.data(), half.size() * 2);
    }
    put(f.tokens.data(), f.tokens.size() * 4);
    put(f.logits.data(), f.logits.size() * 4);
    return out;
}

void write_state_file(const std::string& path, const StateFile& f) {
    MAMBART_CHECK_ARG(!path.empty(), "path is empty");
    const std::string bytes = state_file_bytes(f);
    auto failed = [&](int err) {
        return StateError(str_cat(path, ": cannot write the state file: ", std::strerror(err)));
    };
    // A unique temporary file next to `path`, fsynced, renamed: never a half-written or
    // interleaved file under the final name, whatever other writers do (issue 23).
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
    const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    if (base.empty()) throw failed(EISDIR);
    std::string tmp = (slash == std::string::npos ? "" : dir) + "." + base + ".XXXXXX.tmp";
    const int fd = ::mkstemps(&tmp[0], 4);
    if (fd < 0) throw failed(errno);
    int err = 0;
    if (::fchmod(fd, 0666 & ~process_umask()) != 0) err = errno;
    for (size_t done = 0; !err && done < bytes.size();) {
        const ssize_t k = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) err = errno;
        else done += size_t(k);
    }
    if (!err && ::fsync(fd) != 0) err = errno;
    if (::close(fd) != 0 && !err) err = errno;
    if (!err && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
    if (err) {
        ::unlink(tmp.c_str());
        throw failed(err);
    }
    // The rename survives a crash once the directory is synced (best effort).
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

std::string model_fingerprint(const std::string& model_dir) {
    Sha256 h;
    static const char kTag[] = "mambart-fingerprint-v2";
    h.update(kTag, sizeof kTag);  // with its NUL
    struct stat st {};
    h.update(read_regular_file(model_dir + "/config.json", "config", kMaxConfigBytes, &st));
    const std::string wpath = model_dir + "/model.safetensors";
    Fd fd;
    fd.fd = open_regular_file(wpath, "weights file", &st);
    const uint64_t size = uint64_t(st.st_size);
    h.update(std::to_string(size));
    std::vector<char> buf(1 << 16);
    auto hash_at = [&](uint64_t off, uint64_t n) {  // n bytes at off, fewer at the end
        while (n > 0) {
            const size_t want = size_t(std::min<uint64_t>(n, buf.size()));
            const int64_t k = pread_full(fd.fd, buf.data(), want, off);
            if (k < 0)
                throw ModelLoadError(str_cat(wpath, ": cannot read weights file: ",
                                             std::strerror(errno)));
            if (k == 0) return;
            h.update(buf.data(), size_t(k));
            off += uint64_t(k);
            n -= uint64_t(k);
        }
    };
    unsigned char head[8];
    const int64_t got = pread_full(fd.fd, head, 8, 0);
    if (got < 0)
        throw ModelLoadError(str_cat(wpath, ": cannot read weights file: ", std::strerror(errno)));
    h.update(head, size_t(got));
    uint64_t n = 0;
    if (got == 8)
        for (int i = 0; i < 8; ++i) n |= uint64_t(head[i]) << (8 * i);
    hash_at(8, std::min(n, size));  // the header
    if (n <= size) {  // else the blocks all lie past the end of the file: nothing to hash
        const uint64_t start = 8 + n, block = 4096, count = 64;
        const uint64_t data = size > start ? size - start : 0;
        for (uint64_t i = 0; i < count; ++i)
            hash_at(data > block ? start + (data - block) * i / (count - 1) : start, block);
    }
    return h.hex_digest();
}

}  // namespace mambart
