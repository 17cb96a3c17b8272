#include "support/catch.hpp"

#include <string>

#include <spinquant/error.hpp>

TEST_CASE("spinquant::error carries its code and the message names the function", "[error]")
{
    try {
        spinquant::detail::fail(spinquant::errc::unsupported_size, "fwht", "length 12 is not a power of two");
        FAIL("fail() returned");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == spinquant::errc::unsupported_size);
        CHECK(std::string(e.what()) == "spinquant::fwht: length 12 is not a power of two");
    }
}

TEST_CASE("spinquant::error is a std::invalid_argument", "[error]")
{
    CHECK_THROWS_AS(spinquant::detail::fail(spinquant::errc::bad_shape, "f", "x"), std::invalid_argument);
}

TEST_CASE("every errc has a name", "[error]")
{
    using spinquant::errc;
    for (errc c : {errc::bad_shape, errc::unsupported_size, errc::bits_out_of_range, errc::non_finite,
                   errc::bad_argument, errc::not_positive_definite, errc::bad_file})
        CHECK(spinquant::to_string(c) != "unknown");
    CHECK(spinquant::to_string(errc::non_finite) == "non_finite");
}
