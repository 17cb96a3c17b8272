#pragma once
// A small, strict JSON reader for the golden files (tests only). Numbers are parsed with
// std::from_chars, which rounds correctly, so a float32 stored as its exact double reads back
// bit for bit.
#include <charconv>
#include <cstddef>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace spinquant::test {

class json {
public:
    using array = std::vector<json>;
    using object = std::map<std::string, json>;

    json() = default;
    static json parse(const std::string& text)
    {
        std::size_t pos = 0;
        json v = parse_value(text, pos);
        skip_ws(text, pos);
        if (pos != text.size()) throw std::runtime_error("json: trailing characters at " + std::to_string(pos));
        return v;
    }
    static json parse_file(const std::string& path)
    {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw std::runtime_error("json: cannot open " + path);
        std::ostringstream ss;
        ss << in.rdbuf();
        return parse(ss.str());
    }

    [[nodiscard]] bool is_null() const { return std::holds_alternative<std::monostate>(v_); }
    [[nodiscard]] bool is_number() const { return std::holds_alternative<double>(v_); }
    [[nodiscard]] bool is_string() const { return std::holds_alternative<std::string>(v_); }
    [[nodiscard]] bool is_array() const { return std::holds_alternative<std::shared_ptr<array>>(v_); }
    [[nodiscard]] bool is_object() const { return std::holds_alternative<std::shared_ptr<object>>(v_); }

    [[nodiscard]] double number() const { return get<double>("number"); }
    [[nodiscard]] bool boolean() const { return get<bool>("boolean"); }
    [[nodiscard]] const std::string& string() const { return get<std::string>("string"); }
    [[nodiscard]] const array& items() const { return *get<std::shared_ptr<array>>("array"); }
    [[nodiscard]] const object& members() const { return *get<std::shared_ptr<object>>("object"); }

    [[nodiscard]] const json& operator[](const std::string& key) const
    {
        const auto& m = members();
        const auto it = m.find(key);
        if (it == m.end()) throw std::runtime_error("json: no key '" + key + "'");
        return it->second;
    }
    [[nodiscard]] const json& operator[](std::size_t i) const { return items().at(i); }
    [[nodiscard]] bool contains(const std::string& key) const { return is_object() && members().count(key) != 0; }
    [[nodiscard]] std::size_t size() const { return is_array() ? items().size() : members().size(); }

    /// A numeric array as doubles (a JSON null, e.g. a NaN in the reference, reads as NaN).
    [[nodiscard]] std::vector<double> doubles() const
    {
        std::vector<double> out;
        out.reserve(items().size());
        for (const auto& e : items()) out.push_back(e.is_null() ? std::numeric_limits<double>::quiet_NaN() : e.number());
        return out;
    }
    /// A numeric array as floats (exact for float32 data stored as doubles).
    [[nodiscard]] std::vector<float> floats() const
    {
        std::vector<float> out;
        for (double d : doubles()) out.push_back(static_cast<float>(d));
        return out;
    }
    [[nodiscard]] int integer() const { return static_cast<int>(number()); }

private:
    std::variant<std::monostate, bool, double, std::string, std::shared_ptr<array>, std::shared_ptr<object>> v_;

    template <class T>
    const T& get(const char* what) const
    {
        if (const T* p = std::get_if<T>(&v_)) return *p;
        throw std::runtime_error(std::string("json: value is not a ") + what);
    }

    static void skip_ws(const std::string& s, std::size_t& pos)
    {
        while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\n' || s[pos] == '\r' || s[pos] == '\t')) ++pos;
    }
    static void expect(const std::string& s, std::size_t& pos, char c)
    {
        skip_ws(s, pos);
        if (pos >= s.size() || s[pos] != c)
            throw std::runtime_error(std::string("json: expected '") + c + "' at " + std::to_string(pos));
        ++pos;
    }
    static std::string parse_string(const std::string& s, std::size_t& pos)
    {
        expect(s, pos, '"');
        std::string out;
        while (pos < s.size() && s[pos] != '"') {
            char c = s[pos++];
            if (c == '\\') {
                if (pos >= s.size()) break;
                const char e = s[pos++];
                switch (e) {
                case 'n': out += '\n'; break;
                case 't': out += '\t'; break;
                case 'r': out += '\r'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'u': {
                    // Golden files are ASCII; keep BMP code points as UTF-8 for completeness.
                    const unsigned cp = static_cast<unsigned>(std::stoul(s.substr(pos, 4), nullptr, 16));
                    pos += 4;
                    if (cp < 0x80) {
                        out += static_cast<char>(cp);
                    } else if (cp < 0x800) {
                        out += static_cast<char>(0xC0 | (cp >> 6));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    } else {
                        out += static_cast<char>(0xE0 | (cp >> 12));
                        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    }
                    break;
                }
                default: out += e;
                }
            } else {
                out += c;
            }
        }
        expect(s, pos, '"');
        return out;
    }
    static json parse_value(const std::string& s, std::size_t& pos)
    {
        skip_ws(s, pos);
        if (pos >= s.size()) throw std::runtime_error("json: unexpected end");
        json j;
        const char c = s[pos];
        if (c == '{') {
            ++pos;
            auto obj = std::make_shared<object>();
            skip_ws(s, pos);
            if (s[pos] == '}') {
                ++pos;
            } else {
                for (;;) {
                    std::string key = parse_string(s, pos);
                    expect(s, pos, ':');
                    (*obj)[key] = parse_value(s, pos);
                    skip_ws(s, pos);
                    if (s[pos] == ',') { ++pos; continue; }
                    expect(s, pos, '}');
                    break;
                }
            }
            j.v_ = obj;
        } else if (c == '[') {
            ++pos;
            auto arr = std::make_shared<array>();
            skip_ws(s, pos);
            if (s[pos] == ']') {
                ++pos;
            } else {
                for (;;) {
                    arr->push_back(parse_value(s, pos));
                    skip_ws(s, pos);
                    if (s[pos] == ',') { ++pos; continue; }
                    expect(s, pos, ']');
                    break;
                }
            }
            j.v_ = arr;
        } else if (c == '"') {
            j.v_ = parse_string(s, pos);
        } else if (s.compare(pos, 4, "true") == 0) {
            pos += 4;
            j.v_ = true;
        } else if (s.compare(pos, 5, "false") == 0) {
            pos += 5;
            j.v_ = false;
        } else if (s.compare(pos, 4, "null") == 0) {
            pos += 4;
        } else if (s.compare(pos, 3, "NaN") == 0) {
            pos += 3;
            j.v_ = std::numeric_limits<double>::quiet_NaN();
        } else if (s.compare(pos, 8, "Infinity") == 0 || s.compare(pos, 9, "-Infinity") == 0) {
            const bool neg = s[pos] == '-';
            pos += neg ? 9 : 8;
            j.v_ = neg ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
        } else {
            double d = 0;
            const char* first = s.data() + pos;
            const auto [ptr, ec] = std::from_chars(first, s.data() + s.size(), d);
            if (ec != std::errc()) throw std::runtime_error("json: bad number at " + std::to_string(pos));
            pos += static_cast<std::size_t>(ptr - first);
            j.v_ = d;
        }
        return j;
    }
};

}  // namespace spinquant::test
