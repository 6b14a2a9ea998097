"""GSM8K solutions as chains (codi_attn.solutions): steps, the evaluator, one question number changed with the
solution recomputed, and the answer a changed step leads to."""
from __future__ import annotations

import pytest

from codi_attn.solutions import answer_if, change_number, evaluate, literals, numbers_in, solution_steps, substitute

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
            "in April and May.\n#### 72")
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
            "clips did Natalia sell altogether in April and May?")


def test_steps_and_operations():
    steps = solution_steps(SOLUTION)
    assert [(s.expression, s.value, s.operation) for s in steps] == [("48/2", 24.0, "/"), ("48+24", 72.0, "+")]
    assert solution_steps("<<(3+4)*2=14>> <<1,200-200=1,000>> <<x=oops>>")[1].value == 1000.0
    assert solution_steps("<<(3+4)*2=14>>")[0].operation == "*"
    assert solution_steps("#### 5") == []


def test_evaluate_is_plain_arithmetic_only():
    assert evaluate("(3+4)*2-1/4") == 13.75 and evaluate("-3+1,000") == 997.0
    for bad in ("__import__('os')", "2**8", "1/0", "a+1"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_change_number_changes_exactly_one_number_and_recomputes_the_gold():
    cf = change_number(QUESTION, SOLUTION, 0, 50)
    assert cf is not None and cf.answer == 75.0 and cf.changed == (48.0, 50.0)
    assert [v for _, _, v in numbers_in(cf.question)] == [50.0]
    assert cf.question.replace("50", "48") == QUESTION  # nothing else moved
    assert [s.value for s in cf.steps] == [25.0, 75.0] and cf.solution.endswith("#### 75")


def test_change_number_refuses_what_it_cannot_tell():
    assert change_number("Tom has 3 apples and 3 pears.", "<<3+3=6>>\n#### 6", 0, 4) is None  # 3 twice
    assert change_number("Tom has 3 apples and 6 pears.", "<<3+3=6>>\n#### 6", 0, 4) is None  # a result = 6
    assert change_number("Tom has 3 apples and 5 pears.", "<<5*2=10>>\n#### 10", 0, 4) is None  # 3 unused
    assert change_number("Tom has 3 apples.", "<<3*2=6>>\n#### 6", 5, 4) is None  # no such number


def test_answer_if_a_step_had_another_result():
    assert answer_if(QUESTION, SOLUTION, 1, 30) == 78.0
    assert answer_if(QUESTION, SOLUTION, 2, 10) == 10.0
    assert answer_if("Tom has 2 bags.", "<<4-2=2>>\n<<2*5=10>>\n#### 10", 1, 3) is None  # the question writes 2
    assert answer_if("Tom has 7 bags.", "<<9-7=2>>\n<<2+2=4>>\n<<4-2=2>>\n#### 2", 1, 3) is None  # 2 twice
    assert answer_if(QUESTION, SOLUTION, 3, 1) is None


def test_literals_read_a_leading_decimal_point():
    """`.75` is 0.75 (588 of GSM8K's 7473 train solutions write such a literal), for the answer a step leads to
    and for a changed question number alike."""
    assert literals("3/4+.75*1,200") == [(0, 1, 3.0), (2, 3, 4.0), (4, 7, 0.75), (8, 12, 1200.0)]
    assert answer_if("Tom has 8 bags.", "<<3/4=.75>>\n<<.75*8=6>>\n#### 6", 1, 0.5) == 4.0
    cf = change_number("Each apple costs 0.75 dollars. Tom buys 8 apples. How much does he pay?",
                       "He pays .75*8 = <<.75*8=6>>6 dollars.\n#### 6", 0, 1.75)
    assert cf is not None and cf.answer == 14.0 and cf.steps[0].expression == "1.75*8"


def test_question_numbers_include_a_leading_decimal_point():
    """`$.25` in a question is 0.25 (57 of GSM8K's 7473 train questions write such a number): it can be changed, and
    a step whose value it is makes a literal ambiguous. Parts of other numbers, versions and dates are not numbers."""
    text = "Soda costs $.25 an ounce, 1,200 of them, 3.5 kg at -2 degrees, v1.2.3 and 5.75."
    assert [(text[a:b], v) for a, b, v in numbers_in(text)] == [(".25", 0.25), ("1,200", 1200.0), ("3.5", 3.5),
                                                                ("-2", -2.0), ("5.75", 5.75)]
    question = "Soda costs $.25 an ounce. Peter brought $2 and leaves with $.50. How many ounces did he buy?"
    solution = "He spent <<2-.5=1.5>>1.5 dollars.\nHe bought <<1.5/.25=6>>6 ounces.\n#### 6"
    cf = change_number(question, solution, 0, 0.5)
    assert cf is not None and cf.answer == 3.0 and "costs $0.5 an ounce" in cf.question
    assert answer_if(question, "<<2-1.5=.5>>\n<<.5*2=1>>\n#### 1", 1, 1.0) is None  # .5 also a question number


def test_change_number_refuses_a_chain_that_no_longer_evaluates():
    """Changing 1 to 0 makes a divisor zero (4 GSM8K train problems raised here before any counterfactual): no
    counterfactual, not an error; the same for a step that is not plain arithmetic (`//`)."""
    assert change_number("Tom has 1 box and 30 apples.", "<<30/1*2=60>>\n#### 60", 0, 0) is None
    assert change_number("Tom has 3 boxes and 20 apples.", "<<20//3=6>>\n<<6*3=18>>\n#### 18", 0, 4) is None
    assert change_number("Tom has 1 box and 30 apples.", "<<30/1*2=60>>\n#### 60", 0, 2).answer == 30.0



def test_substitute_rewrites_whole_literals_only():
    """A literal is replaced only where it is a key, as a whole number: 2 in 12 or in .25 stays; commas go."""
    assert substitute("12*2+.25-1,200", {2.0: 3.0, 1200.0: 0.5}) == ("12*3+.25-0.5", True)
    assert substitute("12*4", {2.0: 3.0}) == ("12*4", False)
    assert substitute("2/3", {2.0: 2.5, 3.0: 4.0}) == ("2.5/4", True)

SIDE = "Tom has 4 boxes of 3 pens and 5 more pens. Ann has 25 pens. How many pens does Tom have?"
SIDE_SOLUTION = "<<4*3=12>>\n<<12+5=17>>\nAnn has <<25-17=8>>8 more.\n#### 17"  # the last step is a side calculation


def test_the_gold_follows_the_steps_that_have_its_value():
    """The gold (after '####') moves with step 2, whose value it is, not with the last step; a step that does not
    feed it leaves it; a gold that no step has cannot be told."""
    assert answer_if(SIDE, SIDE_SOLUTION, 1, 13) == 18.0  # 13+5; the last step would give 25-18 = 7
    assert answer_if(SIDE, SIDE_SOLUTION, 3, 9) == 17.0
    assert answer_if(SIDE, "<<4*3=12>>\n<<12+5=17>>\n#### 34", 1, 13) is None  # 34 = 2*17 in the text
    cf = change_number(SIDE, SIDE_SOLUTION, 0, 6)
    assert cf is not None and [s.value for s in cf.steps] == [18.0, 23.0, 2.0]
    assert cf.answer == 23.0 and cf.solution.endswith("#### 23")


def test_each_operator_is_named_as_the_outermost_operation():
    """The operation of a step is its expression's outermost operator, for each of + - * / (a bare number: none)."""
    chain = "<<1+2=3>> <<10-4=6>> <<2*3=6>> <<8/2=4>> <<(9-3)/2=3>> <<7=7>>"
    assert [s.operation for s in solution_steps(chain)] == ["+", "-", "*", "/", "/", ""]


def test_the_gold_cannot_be_told_where_the_steps_with_its_value_disagree():
    """Two steps have the gold's value; the changed step moves one of them and not the other: no gold (gold_after),
    and gold_after itself gives the common new value only where they agree."""
    from codi_attn.solutions import gold_after

    solution = "<<5-3=2>>\n<<2*3=6>>\n<<3+3=6>>\n#### 6"  # step 2 uses step 1's result, step 3 does not
    assert answer_if("Tom has 3 cats.", solution, 1, 3) is None  # step 2 -> 9, step 3 stays 6
    steps = solution_steps(solution)
    assert gold_after(steps, [3.0, 9.0, 6.0], 6.0) is None
    assert gold_after(steps, [3.0, 9.0, 9.0], 6.0) == 9.0
    assert gold_after(steps, [3.0, 9.0, 9.0], 5.0) is None  # no step has the gold's value


def test_change_number_only_takes_an_index_of_the_question():
    """index counts the question's numbers from 0: one past the last, or a negative index, is no number (None),
    not an error and not a number counted from the end."""
    question, solution = "Tom has 3 apples and 5 pears.", "<<3*2=6>>\n<<6+5=11>>\n#### 11"
    assert change_number(question, solution, 0, 4).answer == 13.0
    assert change_number(question, solution, 1, 7).answer == 13.0
    assert change_number(question, solution, 2, 4) is None
    assert change_number(question, solution, -1, 7) is None


def test_change_number_to_the_same_value_is_no_counterfactual():
    assert change_number(QUESTION, SOLUTION, 0, 48) is None
    assert change_number(QUESTION, SOLUTION, 0, 48.0) is None


def test_change_number_refuses_a_step_value_that_two_steps_recompute_apart():
    """Steps 1 and 2 both have the value 6, but once 2 becomes 5 they are 15 and 9: step 3's literal 6 could be
    either, so there is no counterfactual."""
    question = "Tom has 2 boxes of 3 pens and 4 more."
    assert change_number(question, "<<2*3=6>>\n<<4+2=6>>\n<<6+1=7>>\n#### 7", 0, 5) is None
    cf = change_number(question, "<<2*3=6>>\n<<6+4=10>>\n#### 10", 0, 5)  # one step of value 6: no doubt
    assert [s.value for s in cf.steps] == [15.0, 19.0] and cf.answer == 19.0


def test_a_large_changed_number_is_written_out_in_full():
    """A number of a million or more is written as digits in the question and the chain (not 1.5e+06)."""
    cf = change_number("Tom has 3 apples.", "<<3*2=6>>\n#### 6", 0, 1500000)
    assert cf.question == "Tom has 1500000 apples."
    assert cf.solution == "<<1500000*2=3000000>>\n#### 3000000" and cf.answer == 3000000.0


def test_answer_if_takes_only_a_step_of_the_solution():
    """step counts from 1: step 0 (or one past the last) is no step, whatever the value."""
    assert answer_if(QUESTION, SOLUTION, 0, 30) is None
    assert answer_if(QUESTION, SOLUTION, -1, 30) is None
