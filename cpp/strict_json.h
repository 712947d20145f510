// L1 data: strict JSON parsing of untrusted files (safetensors headers, config.json).
//
// nlohmann::json keeps the last of duplicate object keys silently; readers disagree on which one
// wins, so a file with duplicate keys is ambiguous and refused here. Parse-error messages from
// the library quote the offending bytes raw; they are escaped to printable ASCII so that the
// message is valid UTF-8 whatever the file holds.
#pragma once

#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace mambart {

// A parse failure; what() is printable ASCII and says what is wrong (no file name).
class StrictJsonError : public std::runtime_error {
 public:
    StrictJsonError(const std::string& msg, bool duplicate)
        : std::runtime_error(msg), duplicate_key(duplicate) {}
    bool duplicate_key;  // valid JSON, but an object repeats a key
};

// Bytes outside printable ASCII as \xNN.
inline std::string printable_ascii(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (unsigned char ch : s) {
        if (ch >= 0x20 && ch < 0x7f) {
            out += static_cast<char>(ch);
        } else {
            char buf[5];
            std::snprintf(buf, sizeof buf, "\\x%02x", ch);
            out += buf;
        }
    }
    return out;
}

// Parses [first, last); throws StrictJsonError on invalid JSON or a duplicate key in any object.
inline nlohmann::json parse_json_strict(const char* first, const char* last) {
    using nlohmann::json;
    std::vector<std::set<std::string>> keys;  // one set per open object
    auto cb = [&keys](int /*depth*/, json::parse_event_t ev, json& parsed) -> bool {
        switch (ev) {
            case json::parse_event_t::object_start: keys.emplace_back(); break;
            case json::parse_event_t::object_end: if (!keys.empty()) keys.pop_back(); break;
            case json::parse_event_t::key: {
                const std::string& k = parsed.get_ref<const std::string&>();
                if (!keys.empty() && !keys.back().insert(k).second)
                    throw StrictJsonError("duplicate key '" + printable_ascii(k) + "'", true);
                break;
            }
            default: break;
        }
        return true;
    };
    try {
        return json::parse(first, last, cb);
    } catch (const json::exception& e) {
        throw StrictJsonError(printable_ascii(e.what()), false);
    }
}

}  // namespace mambart
